"""Replica models: a real model's architecture family, tokenizer, special tokens, chat template
and prompt format around small random weights.

`replica(spec_or_dir, out=...)` writes a plain Hugging Face directory that `load_model` loads:
the real model's ``config.json`` shrunk to `n_layers` blocks of width `d_model` (same
``model_type``, vocabulary size, rope, norms and special-token ids), randomly initialised
from `seed`, with the real tokenizer (its added tokens at their ids) and chat template, the
prompt format (``waitlens_format.json``) and a ``waitlens_replica.json`` that says where each
part came from and that the weights are random. Every stage of a real-pair study runs on a
replica on a CPU: its numbers test the pipeline, not the model.

Where the parts come from: `spec_or_dir` is a local model directory (its ``config.json`` and
tokenizer files), a ``config.json`` file, or a hub id — with the internet only the config and
tokenizer files are fetched, never weights. `tokenizer` (a directory; with `bpe` for a
config-only R1-distill directory, see `traces.tokenizers.load_tokenizer`) and
`chat_template` (a ``.jinja`` file) override what the spec provides.

Bad input is one line (`ReplicaError`): an architecture transformers cannot build from its
config, a tokenizer directory without a vocabulary, a chat template that does not render.
The directory is built in a temporary folder beside `out` and moved into place complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

REPLICA_FILE = "waitlens_replica.json"
REPLICA_VERSION = 2  # bump when the construction changes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja")
# keys of the real config that describe its size or checkpoint, not its architecture
_DROP_KEYS = ("_name_or_path", "quantization_config", "transformers_version", "layer_types", "torch_dtype", "dtype",
              "_commit_hash", "auto_map")


class ReplicaError(ValueError):
    """A replica that cannot be built; the message names the file or value and why."""


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReplicaError(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise ReplicaError(f"{path}: a model config needs a 'model_type' key")
    return cfg


def _fetch(repo_id: str, revision: str | None, dest: Path) -> Path:
    """Download config.json and the tokenizer files (no weights) of a hub model into `dest`."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise ReplicaError(f"{repo_id}: fetching a hub model's config needs huggingface_hub") from None
    dest.mkdir(parents=True, exist_ok=True)
    try:
        hf_hub_download(repo_id, "config.json", revision=revision, local_dir=dest)
    except Exception as e:  # offline, unknown repo, gated: one line
        raise ReplicaError(
            f"{repo_id!r} is not a local path, and its config.json could not be fetched from the hub "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); give a local model directory or "
            "config.json, with --tokenizer DIR and --chat-template FILE"
        ) from None
    for name in TOKENIZER_FILES:
        try:
            hf_hub_download(repo_id, name, revision=revision, local_dir=dest)
        except Exception:  # not every repo has every file
            continue
    return dest


def resolve_sources(spec_or_dir: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None,
                    revision: str | None = None, workdir: Path | None = None) -> tuple[Path, Path]:
    """(config.json path, tokenizer directory) for a spec: a model directory, a config file, or a hub id."""
    spec = str(spec_or_dir)
    p = Path(spec).expanduser()
    if p.is_dir():
        cfg = p / "config.json"
        if not cfg.is_file():
            raise ReplicaError(f"{p}: no config.json (a replica needs the real model's architecture config)")
        return cfg, Path(tokenizer) if tokenizer is not None else p
    if p.is_file():
        return p, Path(tokenizer) if tokenizer is not None else p.parent
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise ReplicaError(f"replica source not found: {spec} (a model directory, a config.json, or a hub id)")
    d = _fetch(spec, revision, Path(workdir or tempfile.mkdtemp(prefix="waitlens-replica-src-")))
    return d / "config.json", Path(tokenizer) if tokenizer is not None else d


def shrink_config(cfg: dict, *, n_layers: int, d_model: int, n_vocab: int) -> dict:
    """The real config with `n_layers` blocks of width `d_model` (heads of width 16, the real
    query/key-value head ratio where it divides), every other architectural setting kept."""
    if n_layers < 1 or d_model < 16 or d_model % 16:
        raise ReplicaError(f"a replica needs n_layers >= 1 and d_model a multiple of 16, got {n_layers}, {d_model}")
    out = {k: v for k, v in cfg.items() if k not in _DROP_KEYS}
    heads = d_model // 16
    real_heads = int(cfg.get("num_attention_heads") or heads)
    real_kv = int(cfg.get("num_key_value_heads") or real_heads)
    ratio = max(1, real_heads // max(real_kv, 1))
    kv = heads // ratio if heads % ratio == 0 and heads >= ratio else heads
    out.update(num_hidden_layers=n_layers, hidden_size=d_model, intermediate_size=4 * d_model,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=16)
    for key in ("max_window_layers",):
        if key in out:
            out[key] = min(int(out[key]), n_layers)
    out["vocab_size"] = max(int(cfg.get("vocab_size") or 0), n_vocab)
    return out


def _check_template(tok, where: str) -> None:
    """The chat template renders one user turn (with a generation prompt)."""
    if not getattr(tok, "chat_template", None):
        return
    try:
        text = tok.apply_chat_template([{"role": "user", "content": "What is 1+1?"}], tokenize=False,
                                       add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateSyntaxError / UndefinedError / TemplateError
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ReplicaError(f"{where}: the chat template does not render ({type(e).__name__}: {msg})") from None
    if "What is 1+1?" not in text:
        raise ReplicaError(f"{where}: the chat template renders without the user's message")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_key(cfg_path, tok_dir, bpe, chat_template, format, n_layers, d_model, seed, name) -> str:
    """A content hash of everything that defines a replica (files by content, not by path)."""
    h = hashlib.sha256()
    files = [Path(cfg_path)] + [Path(d) / f for d in (tok_dir, bpe) if d is not None for f in TOKENIZER_FILES]
    if chat_template is not None:
        files.append(Path(chat_template))
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(json.dumps([str(format) if not isinstance(format, dict) else format, n_layers, d_model, seed, name,
                         REPLICA_VERSION], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def replica(spec_or_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, n_layers: int = 2,
            d_model: int = 64, seed: int = 0, tokenizer: str | os.PathLike | None = None,
            chat_template: str | os.PathLike | None = None, bpe: str | os.PathLike | None = None,
            format: Any = None, revision: str | None = None, overwrite: bool = False,
            spec_name: str | None = None) -> Path:
    """Build a replica of a real model (module doc) into `out`; returns `out`.

    out: the directory to write (default: a cache folder keyed by everything that defines the
    replica, reused when it exists). format: a prompt-format preset name, dict or PromptFormat
    (default: inferred from the chat template). spec_name: the real model's name for the
    provenance (default: `spec_or_dir`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from waitlens.traces.atomic import atomic_dir
    from waitlens.traces.formats import PromptFormat, get_format
    from waitlens.traces.tokenizers import TokenizerLoadError, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="waitlens-replica-src-") as srcdir:
        cfg_path, tok_dir = resolve_sources(spec_or_dir, tokenizer=tokenizer, revision=revision,
                                            workdir=Path(srcdir))
        real = _read_config(cfg_path)
        name = spec_name or str(spec_or_dir)
        key = _source_key(cfg_path, tok_dir, bpe, chat_template, format, n_layers, d_model, seed, name)
        if out is None:
            from waitlens.hooks.models import cache_dir

            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name)
            out = cache_dir() / "replicas" / f"{safe}-{n_layers}x{d_model}-s{seed}-{key}"
        out = Path(out)
        existing = out / REPLICA_FILE
        if existing.is_file() and not overwrite and json.loads(existing.read_text()).get("key") == key:
            return out  # the same replica, already built
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise ReplicaError(f"{out} exists and is not empty; choose another --out or remove it")
        try:
            tok = load_tokenizer(tok_dir, chat_template, bpe=bpe)
        except TokenizerLoadError as e:
            raise ReplicaError(f"replica tokenizer: {e}") from None
        where = str(chat_template) if chat_template is not None else str(tok_dir)
        _check_template(tok, where)
        try:
            fmt = get_format(format, tok)
        except (ValueError, TypeError) as e:
            raise ReplicaError(f"replica format {format!r}: {e}") from None
        if fmt.chat_template and not getattr(tok, "chat_template", None):
            raise ReplicaError(f"prompt format {fmt.name!r} needs a chat template, and {tok_dir} has none; "
                               "give one with chat_template=FILE (--chat-template)")
        small = shrink_config(real, n_layers=n_layers, d_model=d_model, n_vocab=len(tok))
        model_type = small.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **small)
        except (ValueError, KeyError, TypeError) as e:
            raise ReplicaError(f"{cfg_path}: transformers cannot build a model of type {model_type!r} from its config "
                               f"({' '.join(str(e).split())[:200]})") from None
        config.use_cache = True
        provenance = {
            "replica_of": name, "random_weights": True, "key": key,
            "note": "random weights: numbers from this model test the pipeline, not the real model",
            "config": {"path": str(cfg_path), "sha256": _sha256(cfg_path), "model_type": model_type,
                       "real_n_layers": real.get("num_hidden_layers"), "real_d_model": real.get("hidden_size")},
            "tokenizer": {"path": str(tok_dir), "bpe": str(bpe) if bpe else None, "n_vocab": len(tok),
                          "class": type(tok).__name__},
            "chat_template": {"path": str(chat_template) if chat_template else None,
                              "sha256": hashlib.sha256((tok.chat_template or "").encode()).hexdigest()},
            "format": fmt.to_dict(), "n_layers": n_layers, "d_model": d_model, "seed": seed,
        }
        try:
            model = _build(AutoModelForCausalLM, config, seed, torch)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ReplicaError(f"{cfg_path}: transformers cannot build a causal LM of type {model_type!r} "
                               f"({' '.join(str(e).split())[:200]})") from None
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            for gen in (Path(tok_dir) / "generation_config.json", Path(cfg_path).parent / "generation_config.json"):
                if gen.is_file():  # the real sampling defaults and bos/eos ids
                    shutil.copyfile(gen, tmp / "generation_config.json")
                    break
            PromptFormat.from_dict(fmt.to_dict()).save(tmp)
            (tmp / REPLICA_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
            _check_saved(tmp, tok)
    return out


def _build(auto, config, seed: int, torch):
    torch.manual_seed(seed)
    model = auto.from_config(config, dtype=torch.float32)
    return model.eval()


def _check_saved(path: Path, tok) -> None:
    """The saved tokenizer gives the same ids as the one it was saved from (added tokens too)."""
    from waitlens.hooks.models import load_tokenizer as load_saved

    again = load_saved(path)
    probe = "Wait, let me check 12+7 again.\n"
    specials = [t for t in list(getattr(tok, "added_tokens_decoder", {}).values())[:8]]
    text = probe + "".join(str(t) for t in specials) + " so 3 * 4 = 12"
    a = tok(text, add_special_tokens=False)["input_ids"]
    b = again(text, add_special_tokens=False)["input_ids"]
    if a != b:
        raise ReplicaError(f"{path}: the saved tokenizer does not reproduce the source tokenizer's ids")


def replica_info(model_dir: str | os.PathLike) -> dict | None:
    """The provenance a replica directory records, or None for any other directory."""
    p = Path(model_dir) / REPLICA_FILE
    if not p.is_file():
        return None
    return json.loads(p.read_text())


__all__ = ["REPLICA_FILE", "ReplicaError", "replica", "replica_info", "resolve_sources", "shrink_config"]
