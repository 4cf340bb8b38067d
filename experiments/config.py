"""Study configs: a TOML file, checked in full before any model work.

Every key is known: a typo'd key fails with the closest valid name. Model specs are resolved
(local paths exist, named families are installed) and stage requirements are checked (e.g.
cross-model patching needs equal layer counts and widths) before anything is loaded.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import tomllib

from waitlens.traces.errors import WaitlensError

CONFIG_DIR = Path(__file__).parent / "configs"
PROBLEM_SOURCES = ("organism", "arithmetic", "jsonl", "hf")
STAGES = ("trajectories", "positions", "capture", "tokens", "answers", "probes", "patching", "ablations",
          "interventions", "report")
# what a config without `stages` runs: every stage but the opt-in ones (forced-wait interventions)
DEFAULT_STAGES = tuple(s for s in STAGES if s != "interventions")


class ConfigError(WaitlensError):
    """A config that cannot run; the message names the file, the key and the problem."""


@dataclass
class ModelSpec:
    spec: str = ""  # "" with a tokenizer: a model without weights (positions and token counts only)
    format: str | dict | None = None  # prompt-format preset name or fields; None: the model's own
    dtype: str = "auto"
    revision: str | None = None
    tokenizer: str | None = None  # a tokenizer directory (relative: to the config file, cwd or repo root)
    chat_template: str | None = None  # a .jinja chat template file
    bpe: str | None = None  # the Qwen2 BPE directory, for an R1-distill tokenizer config without vocabulary
    trajectories: dict | None = None  # this model's [trajectories] keys (path, fields, format, ...)

    @property
    def has_weights(self) -> bool:
        return bool(self.spec)


@dataclass
class TrajectoryConfig:
    source: str = "sample"  # sample | jsonl | hf
    path: str | None = None  # jsonl
    dataset: str | None = None  # hf: dataset name
    split: str = "test"
    fields: dict = field(default_factory=lambda: {"prompt": "problem", "gold": "answer"})
    problems: str = "organism"  # sample: where problems come from (PROBLEM_SOURCES)
    n_problems: int = 100
    n_per_problem: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    force_answer: bool = True  # a completion that never answers gets its answer forced (budget forcing)
    from_models: list[str] = field(default_factory=list)  # which models generate (default: all)
    engine: str = "hf"  # hf (transformers generate) | vllm (pip install 'waitlens[vllm]')
    max_thinking_tokens: int | None = None  # budget forcing: cap the reasoning, then force the answer
    extend_thinking: int = 0  # budget forcing: replace the model's close of its reasoning N times ...
    extend_word: str = "Wait"  # ... with this word ("wait" where the tokenizer lacks it, e.g. the organism)
    tensor_parallel_size: int = 1  # vllm only: GPUs per model
    gpu_memory_utilization: float = 0.9  # vllm only: fraction of GPU memory for weights + KV cache
    format: str | None = None  # jsonl/hf: records read by this format family (r1, s1, skyt1, ...), fields
    #   mapping prompt/completion/gold/... to dotted paths (traces.import_records); None: trajectory JSONL
    unfinished: str = "keep"  # imported completions that never close their reasoning: keep | drop
    limit: int = 0  # use only each model's first N trajectories (after import); 0: all


@dataclass
class CaptureConfig:
    layers: str | list[int] = "all"
    hook: str = "resid_post"
    controls: bool = True
    anchor: str = "first"
    storage_dtype: str = "float32"
    batch_size: int = 8


@dataclass
class TokensConfig:
    min_count: int = 5
    n_boot: int = 500
    compare: list[list[str]] = field(default_factory=list)  # groups of models sharing problems (default: all)


@dataclass
class AnswersConfig:
    every: int = 8
    around: int = 2
    window: int = 8
    jump: float = 0.3
    confidence: float = 0.5
    max_trajectories: int = 200


@dataclass
class ProbesConfig:
    words: list[str] = field(default_factory=lambda: ["wait", "all"])
    folds: int = 5
    n_boot: int = 500
    transfer: bool = True


@dataclass
class PatchingConfig:
    source: str = "post"
    target: str = "sft"
    both_directions: bool = True
    layers: str | list[int] = "all"
    window: list[int] = field(default_factory=lambda: [-2, 4])
    metrics: list[str] = field(default_factory=lambda: ["kl", "gold_prob", "correction"])
    max_trajectories: int = 60
    attribution: bool = True
    sampled: bool = True  # greedy continuations after patched waits that follow slips (needs organism truth)
    controls: bool = True


@dataclass
class AblationsConfig:
    model: str = "post"
    kinds: list[str] = field(default_factory=lambda: ["replace-wait", "remove-wait", "shuffle-steps", "delete-steps"])
    max_trajectories: int = 100


@dataclass
class InterventionsConfig:
    at: str = "end"  # end (s1's setting: where the model closed its reasoning) | steps (a step boundary)
    word: str | None = None  # the forced word; default Wait (wait where the tokenizer lacks it)
    n: int = 1  # forced words per trajectory
    models: list[str] = field(default_factory=list)  # which models (default: all)
    max_trajectories: int = 400


@dataclass
class StudyConfig:
    name: str = "organism"
    seed: int = 0
    models: dict[str, ModelSpec] = field(default_factory=dict)
    lexicon: list[str] = field(default_factory=lambda: ["wait", "so", "therefore", "alternatively", "hmm", "but", "check", "verify"])
    stages: list[str] = field(default_factory=lambda: list(DEFAULT_STAGES))
    device: str | None = None
    device_map: str | dict | None = None  # Accelerate placement of every model ("auto", or module -> device)
    trajectories: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    tokens: TokensConfig = field(default_factory=TokensConfig)
    answers: AnswersConfig = field(default_factory=AnswersConfig)
    probes: ProbesConfig = field(default_factory=ProbesConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    ablations: AblationsConfig = field(default_factory=AblationsConfig)
    interventions: InterventionsConfig = field(default_factory=InterventionsConfig)
    source: str = ""  # the file it was read from

    def to_dict(self) -> dict[str, Any]:
        """Everything that defines the study (not where the file was read from)."""
        out = _to_plain(self)
        out.pop("source")
        return out


def _to_plain(obj):
    if is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_plain(v) for v in obj]
    return obj


_SECTIONS = {
    "trajectories": TrajectoryConfig, "capture": CaptureConfig, "tokens": TokensConfig,
    "answers": AnswersConfig, "probes": ProbesConfig, "patching": PatchingConfig,
    "ablations": AblationsConfig, "interventions": InterventionsConfig,
}


def default_config_path() -> Path:
    return CONFIG_DIR / "organism.toml"


def load_config(path: str | Path | None = None) -> StudyConfig:
    """Read and check a study config (default: the organism study shipped with waitlens)."""
    path = Path(path) if path is not None else default_config_path()
    if not path.is_file():
        shipped = CONFIG_DIR / Path(path).name
        if shipped.is_file():
            path = shipped
        else:
            raise ConfigError(f"config not found: {path} (shipped configs: {sorted(p.name for p in CONFIG_DIR.glob('*.toml'))})")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], *, source: str = "<config>") -> StudyConfig:
    top_known = {f.name for f in fields(StudyConfig)} - {"source"}
    _check_keys(raw, top_known, source, "")
    kwargs: dict[str, Any] = {"source": source}
    for key, value in raw.items():
        if key in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table")
            _check_keys(value, {f.name for f in fields(_SECTIONS[key])}, source, key + ".")
            kwargs[key] = _SECTIONS[key](**value)
        elif key == "models":
            kwargs[key] = _parse_models(value, source)
        else:
            kwargs[key] = value
    cfg = StudyConfig(**kwargs)
    _check_values(cfg, source)
    return cfg


def _parse_models(value, source) -> dict[str, ModelSpec]:
    if not isinstance(value, dict) or not value:
        raise ConfigError(f"{source}: [models] must map short names to specs, e.g. sft = \"organism:sft-1k\"")
    out = {}
    for name, v in value.items():
        if isinstance(v, str):
            out[name] = ModelSpec(spec=v)
        elif isinstance(v, dict):
            _check_keys(v, {f.name for f in fields(ModelSpec)}, source, f"models.{name}.")
            if "spec" not in v and "tokenizer" not in v:
                raise ConfigError(f"{source}: models.{name} needs a 'spec' (hub id, path, or family:variant) "
                                  "or a 'tokenizer' directory (no weights)")
            if isinstance(v.get("trajectories"), dict):
                _check_keys(v["trajectories"], {f.name for f in fields(TrajectoryConfig)}, source,
                            f"models.{name}.trajectories.")
            out[name] = ModelSpec(**v)
        else:
            raise ConfigError(f"{source}: models.{name} must be a spec string or a table")
    return out


def _check_keys(table: dict, known: set[str], source: str, prefix: str) -> None:
    for key in table:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (known: {', '.join(sorted(known))})"
            raise ConfigError(f"{source}: unknown key '{prefix}{key}'{hint}")


def _check_values(cfg: StudyConfig, source: str) -> None:
    if not cfg.models:
        raise ConfigError(f"{source}: no [models] given")
    check_value_types(cfg, source)
    bad = [s for s in cfg.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"{source}: unknown stage(s) {bad}; stages are {list(STAGES)}")
    if cfg.trajectories.source not in ("sample", "jsonl", "hf"):
        raise ConfigError(f"{source}: trajectories.source must be 'sample', 'jsonl' or 'hf'")
    t = cfg.trajectories
    if t.problems not in PROBLEM_SOURCES:
        raise ConfigError(f"{source}: trajectories.problems must be one of {PROBLEM_SOURCES}, got {t.problems!r}")
    uses_jsonl = t.source == "jsonl" or (t.source == "sample" and t.problems == "jsonl")
    uses_hf = t.source == "hf" or (t.source == "sample" and t.problems == "hf")
    own_paths = all(m.trajectories and m.trajectories.get("path") for m in cfg.models.values())
    if uses_jsonl and not t.path and not own_paths:
        raise ConfigError(f"{source}: reading trajectories or problems from JSONL needs trajectories.path")
    for name, m in cfg.models.items():  # each model's own trajectory keys, as the section's
        for key, choices in (("format", CHOICES["trajectories.format"]), ("unfinished", ("keep", "drop"))):
            v = (m.trajectories or {}).get(key)
            if v is not None and v not in choices:
                raise ConfigError(f"{source}: models.{name}.trajectories.{key} has {v!r}; valid values: "
                                  f"{', '.join(choices)}")
        if m.trajectories and not isinstance(m.trajectories.get("fields", {}), dict):
            raise ConfigError(f"{source}: models.{name}.trajectories.fields must be a table")
    if uses_hf and not t.dataset:
        raise ConfigError(f"{source}: reading from a Hugging Face dataset needs trajectories.dataset")
    for role in (cfg.patching.source, cfg.patching.target, cfg.ablations.model, *cfg.trajectories.from_models,
                 *cfg.interventions.models, *(m for g in cfg.tokens.compare for m in g)):
        if role not in cfg.models:
            raise ConfigError(f"{source}: model {role!r} is used but not defined in [models] ({sorted(cfg.models)})")
    if len(cfg.patching.window) != 2 or cfg.patching.window[0] > cfg.patching.window[1]:
        raise ConfigError(f"{source}: patching.window must be [lo, hi] with lo <= hi, got {cfg.patching.window}")


# -- value checks -------------------------------------------------------------------------------
# Table-driven: every key's type comes from its dataclass annotation (bool, int, float, str,
# list[...], dict, unions, None), so a new key is type-checked as soon as it has a field. Add its
# range to RANGES and its allowed values to CHOICES here (keys are dotted: "section.key";
# "models.*.key" for every model's table). A bool is never accepted as a number, a string never
# as a bool or a list ("false" is not false; "wait" is not ["wait"]).
RANGES: dict[str, tuple[float | None, float | None]] = {  # inclusive (lo, hi); None: unbounded
    "seed": (0, None),
    "trajectories.n_problems": (1, None),
    "trajectories.n_per_problem": (1, None),
    "trajectories.limit": (0, None),
    "trajectories.temperature": (0, None),
    "trajectories.top_p": (1e-9, 1),
    "trajectories.max_new_tokens": (1, None),
    "capture.batch_size": (1, None),
    "tokens.min_count": (1, None),
    "tokens.n_boot": (1, None),
    "answers.every": (1, None),
    "answers.around": (0, None),
    "answers.window": (1, None),
    "answers.jump": (0, 1),
    "answers.confidence": (0, 1),
    "answers.max_trajectories": (1, None),
    "probes.folds": (2, None),
    "probes.n_boot": (1, None),
    "patching.max_trajectories": (1, None),
    "ablations.max_trajectories": (1, None),
    "trajectories.max_thinking_tokens": (1, None),
    "trajectories.extend_thinking": (0, None),
    "trajectories.tensor_parallel_size": (1, None),
    "trajectories.gpu_memory_utilization": (1e-9, 1),
    "interventions.n": (1, None),
    "interventions.max_trajectories": (1, None),
}
# allowed values of a string key, or of each element of a list key (tests keep these equal to
# the constants of the modules that use them, which config does not import: it stays light)
CHOICES: dict[str, tuple[str, ...]] = {
    "trajectories.source": ("sample", "jsonl", "hf"),
    "trajectories.problems": PROBLEM_SOURCES,
    "capture.hook": ("resid_post", "resid_pre"),
    "capture.anchor": ("first", "last", "both"),
    "capture.storage_dtype": ("float32", "float16", "bfloat16"),
    "ablations.kinds": ("replace-wait", "remove-wait", "shuffle-steps", "delete-steps"),
    "stages": STAGES,
    "trajectories.engine": ("hf", "vllm"),
    "interventions.at": ("end", "steps"),
    "trajectories.format": ("r1", "s1", "skyt1", "qwen", "chat", "plain", "organism"),
    "trajectories.unfinished": ("keep", "drop"),
    "models.*.dtype": ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"),
}
NONEMPTY = ("lexicon", "stages", "probes.words", "patching.metrics", "ablations.kinds")  # lists
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a plain name: a run dir is <runs>/<name>
_LAYERS = re.compile(r"^all$|^\d+(,\d+)*$")


def check_value_types(cfg: StudyConfig, source: str) -> None:
    """Type, range and choice checks of every value (raises ConfigError naming the key)."""
    for key, value, tp in _all_values(cfg):
        problem = _type_problem(value, tp)
        if problem:
            raise ConfigError(f"{source}: {key} must be {problem}, got {value!r}")
        rule = key if not key.startswith("models.") else "models.*." + key.rsplit(".", 1)[-1]
        if rule in RANGES and not isinstance(value, bool) and isinstance(value, int | float):
            lo, hi = RANGES[rule]
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                span = f"between {lo} and {hi}" if lo is not None and hi is not None else (
                    f"at least {lo}" if lo is not None else f"at most {hi}")
                raise ConfigError(f"{source}: {key} must be {span}, got {value!r}")
        if rule in CHOICES and value is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in CHOICES[rule]]
            if bad:
                raise ConfigError(f"{source}: {key} has {bad[0]!r}; valid values: {', '.join(CHOICES[rule])}")
        if rule in NONEMPTY and isinstance(value, list) and not value:
            raise ConfigError(f"{source}: {key} must not be empty")
        if rule.endswith("layers") and isinstance(value, str) and not _LAYERS.match(value):
            raise ConfigError(f"{source}: {key} must be 'all' or a list of layer numbers, got {value!r}")
        if rule.endswith("layers") and isinstance(value, list) and any(v < 0 for v in value):
            raise ConfigError(f"{source}: {key} must hold layer numbers >= 0, got {value!r}")
    if not RUN_NAME.match(cfg.name) or cfg.name in (".", ".."):
        raise ConfigError(
            f"{source}: name must be a plain name (letters, digits, '.', '_', '-'; no '/' or '..'), got "
            f"{cfg.name!r}: the run directory is <runs>/<name>"
        )
    dup = sorted({s for s in cfg.stages if cfg.stages.count(s) > 1})
    if dup:
        raise ConfigError(f"{source}: stages lists {dup[0]!r} twice")
    lexicon = {" ".join(w.lower().split()) for w in cfg.lexicon}
    unknown = [w for w in cfg.probes.words if w not in ("all", "<control>") and w.lower() not in lexicon]
    if unknown:  # found now, not after capture
        raise ConfigError(f"{source}: probes.words has {unknown[0]!r}, which is not in lexicon "
                          f"({', '.join(cfg.lexicon)}); use lexicon words or 'all'")


def _all_values(cfg: StudyConfig):
    """(dotted key, value, annotated type) of every config value."""
    hints = typing.get_type_hints(StudyConfig)
    for f in fields(StudyConfig):
        if f.name in ("source", "models") or f.name in _SECTIONS:
            continue
        yield f.name, getattr(cfg, f.name), hints[f.name]
    for section in _SECTIONS:
        obj = getattr(cfg, section)
        sh = typing.get_type_hints(type(obj))
        for f in fields(obj):
            yield f"{section}.{f.name}", getattr(obj, f.name), sh[f.name]
    mh = typing.get_type_hints(ModelSpec)
    for name, m in cfg.models.items():
        for f in fields(m):
            yield f"models.{name}.{f.name}", getattr(m, f.name), mh[f.name]


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
               dict: "a table", type(None): "absent"}


def _type_problem(value, tp) -> str | None:
    """None if `value` is a `tp` (as TOML gives it), else what it must be, in words."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if any(_type_problem(value, t) is None for t in options):
            return None
        return " or ".join(_type_problem(_Never, t) or "" for t in options if t is not type(None))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            return f"a list of {_plural(item)}"
        if any(_type_problem(v, item) for v in value):
            return f"a list of {_plural(item)}"
        return None
    if origin is dict or tp is dict:
        return None if isinstance(value, dict) else "a table"
    if tp is Any:
        return None
    if tp is bool:
        return None if isinstance(value, bool) else "true or false"
    if tp is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if tp is float:
        return None if isinstance(value, int | float) and not isinstance(value, bool) else "a number"
    if isinstance(tp, type):
        return None if isinstance(value, tp) else _TYPE_WORDS.get(tp, tp.__name__)
    return None  # an annotation this checker does not know: accepted


class _Never:
    """A value of no type (to word a union's options)."""


def _plural(tp) -> str:
    return {str: "strings", int: "integers", float: "numbers", bool: "booleans"}.get(tp, "values")


def check_models(cfg: StudyConfig) -> dict[str, dict]:
    """Resolve every model spec and read its shape without loading weights.

    Returns {name: {"spec", "path", "n_layers", "d_model", "model_type"}}; raises ConfigError
    for an unknown family or path, and for a patching pair of different shapes.
    """
    from waitlens.hooks.models import ModelLoadError, describe_spec

    facts = {}
    for name, m in cfg.models.items():
        for key in ("tokenizer", "chat_template", "bpe"):
            if getattr(m, key) is not None:
                resolve_path(getattr(m, key), cfg.source, f"models.{name}.{key}")
        if not m.has_weights:  # a tokenizer only: positions and counts, no stage that needs weights
            facts[name] = {"spec": name, "path": str(resolve_path(m.tokenizer, cfg.source, f"models.{name}.tokenizer")),
                           "n_layers": None, "d_model": None, "model_type": None, "weights": False}
            continue
        try:
            facts[name] = describe_spec(m.spec, revision=m.revision)
        except ModelLoadError as e:
            raise ConfigError(f"{cfg.source}: models.{name}: {e}") from None
    for name, t in model_trajectories(cfg).items():
        if t.source == "jsonl" and t.path:
            resolve_path(t.path, cfg.source, f"models.{name}.trajectories.path" if cfg.models[name].trajectories
                         and "path" in cfg.models[name].trajectories else "trajectories.path")
    _check_layers(cfg, facts)
    t = cfg.trajectories
    if t.path and (t.source == "jsonl" or t.problems == "jsonl") and not resolve_path(
            t.path, cfg.source, "trajectories.path").is_file():
        raise ConfigError(f"{cfg.source}: trajectories.path: file not found: {t.path}")
    if "patching" in cfg.stages:
        a, b = facts[cfg.patching.source], facts[cfg.patching.target]
        for key in ("n_layers", "d_model"):
            if a.get(key) and b.get(key) and a[key] != b[key]:
                raise ConfigError(
                    f"{cfg.source}: cross-model patching needs models of the same shape, but "
                    f"{cfg.patching.source} ({a['spec']}) has {key}={a[key]} and {cfg.patching.target} "
                    f"({b['spec']}) has {key}={b[key]}; remove 'patching' from stages or pick another pair"
                )
    return facts


def _check_layers(cfg: StudyConfig, facts: dict[str, dict]) -> None:
    """capture.layers / patching.layers inside every model that uses them."""
    uses = {"capture.layers": (cfg.capture.layers, list(cfg.models), "capture"),
            "patching.layers": (cfg.patching.layers, [cfg.patching.source, cfg.patching.target], "patching")}
    for key, (layers, names, stage) in uses.items():
        if layers == "all" or stage not in cfg.stages:
            continue
        wanted = [int(x) for x in layers.split(",")] if isinstance(layers, str) else list(layers)
        for name in names:
            n = facts.get(name, {}).get("n_layers")
            bad = [x for x in wanted if n and x >= n]
            if bad:
                raise ConfigError(f"{cfg.source}: {key}: layer {bad[0]} does not exist in models.{name} "
                                  f"({facts[name]['spec']} has layers 0..{n - 1})")


# -- real data: per-model trajectory sources and paths relative to the config --------------------
REPO_ROOT = Path(__file__).resolve().parents[1]  # the folder holding experiments/ (a source checkout)


def resolve_path(path: str | Path, source: str, key: str) -> Path:
    """A config path: absolute as given; relative, the first that exists of the config file's
    folder, the working directory and the repository root (so ``../shared/realdata/...`` works
    from a clean clone beside it). Missing: a ConfigError naming the key and the path."""
    p = Path(path).expanduser()
    if p.is_absolute():
        candidates = [p]
    else:
        base = Path(source).parent if source and not source.startswith("<") else Path.cwd()
        candidates = list(dict.fromkeys([base / p, Path.cwd() / p, REPO_ROOT / p]))
    for c in candidates:
        if c.exists():
            return c.resolve()
    raise ConfigError(f"{source}: {key}: not found: {path} (looked in {', '.join(str(c.parent) for c in candidates)})")


def model_trajectories(cfg: StudyConfig) -> dict[str, TrajectoryConfig]:
    """Each model's trajectory settings: [trajectories] with its own `models.NAME.trajectories`
    keys on top (e.g. each model's file and field paths when every model is imported)."""
    from dataclasses import replace

    out = {}
    for name, m in cfg.models.items():
        out[name] = replace(cfg.trajectories, **m.trajectories) if m.trajectories else cfg.trajectories
    return out
