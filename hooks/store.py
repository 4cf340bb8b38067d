"""The activation store: residual-stream states at chosen token positions, on disk.

A store is a directory::

    manifest.json              what was captured: model, revision, hook, layers, d_model,
                               storage dtype, lexicon, prompt format, shards, versions, and
                               `complete` (true only once every shard is written)
    shard-00000.safetensors    tensor `states` [n, n_layers, d_model] (storage dtype)
    shard-00000.csv            the n positions of that shard (one row each)
    ...
    metadata.csv               all positions, merged at the end: the `traces.Positions`
                               columns + `model`, `shard`, `row` (row = global row index)

Every file is written under a temporary name and renamed into place; within a shard the csv
goes first and the safetensors last, so a shard exists exactly when its safetensors does.
A store whose manifest says `complete: false` (an interrupted capture) is refused by the
reader with a message saying to rerun the capture, which then resumes.

The store checks itself: the manifest records each shard's size and sha256, the metadata's
sha256, and what the states came from (`weights_sha256` of the model's weight files and its
`compute_dtype`). Opening a store checks every shard's size and tensor shape; the first read
of a shard checks its sha256, `metadata` checks its sha256 and row order, and
`ActivationStore.verify()` (`waitlens store verify DIR`) checks everything. A resumed capture
refuses other weights or another compute dtype (naming both values) and recaptures a shard
that fails its checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor

from waitlens.hooks.models import LoadedModel
from waitlens.traces.atomic import atomic_dir, atomic_write, write_json
from waitlens.traces.errors import WaitlensError

FORMAT = "waitlens-activations/1"
MANIFEST = "manifest.json"
METADATA = "metadata.csv"
TENSOR = "states"
STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The columns every store's metadata has (the contract with the probes).
REQUIRED_COLUMNS = ("trajectory_id", "problem_id", "word", "token_index", "rel_index", "frac", "correct")
_STR_COLUMNS = ("trajectory_id", "problem_id", "word", "surface", "anchor", "model")


class StoreError(WaitlensError):
    """A directory that is not a readable activation store; the message says what to do."""


class IncompleteStoreError(StoreError):
    """A store whose capture was interrupted (manifest `complete: false`)."""


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def storage_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        if name not in STORAGE_DTYPES.values():
            raise ValueError(f"storage dtype {name} not supported; use one of {sorted(STORAGE_DTYPES)}")
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"unknown storage dtype {name!r}; use one of {sorted(STORAGE_DTYPES)}")
    return STORAGE_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in STORAGE_DTYPES.items()}[dtype]


def versions() -> dict[str, str | None]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("waitlens", "torch", "transformers", "transformer-lens", "safetensors", "scikit-learn", "numpy"):
        try:
            out[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- atomic writes ----------------------------------------------------------------------------
def _atomic(path: Path, write) -> None:
    """Call `write(tmp_path)`, fsync, and rename onto `path` (no partial file is ever visible)."""
    atomic_write(path, write)




def write_csv(path: Path, table: pd.DataFrame) -> None:
    _atomic(path, lambda tmp: table.to_csv(tmp, index=False))


def write_shard(
    out_dir: Path,
    index: int,
    states: Float[Tensor, "n layer d_model"],
    metadata: pd.DataFrame,
    fingerprint: str = "",
) -> dict[str, Any]:
    """Write one shard (csv first, safetensors last: the commit point); returns its manifest
    entry (file, n, fingerprint, bytes, sha256)."""
    name = shard_name(index)
    write_csv(out_dir / f"{name}.csv", metadata)
    tensors = {TENSOR: states.contiguous()}
    _atomic(out_dir / f"{name}.safetensors",
            lambda tmp: save_canonical(tensors, tmp, metadata={"fingerprint": fingerprint, "format": FORMAT}))
    entry = {"file": f"{name}.safetensors", "n": int(states.shape[0]), "fingerprint": fingerprint}
    return {**entry, **file_facts(out_dir / entry["file"])}


def save_canonical(tensors: dict[str, Tensor], path, metadata: dict[str, str]) -> None:
    """`safetensors.torch.save_file`, with the JSON header's keys sorted: safetensors writes its
    metadata map in a per-process random order, so the same shard would differ byte for byte
    (and in sha256) between two processes (data-parallel ranks, a resumed run)."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    canon = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(canon) > n:  # cannot happen: same content, same compact encoding
        raise StoreError("safetensors header grew when its keys were sorted")
    with open(path, "wb") as fh:
        fh.write(raw[:8] + canon + b" " * (n - len(canon)) + raw[8 + n:])


# -- checksums --------------------------------------------------------------------------------
def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_facts(path: Path) -> dict[str, Any]:
    """{"bytes", "sha256"} of a file (what the manifest records for each shard)."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_DIGESTS: dict[str, str] = {}  # "path|size|mtime_ns" -> sha256 (also kept in <cache>/sha256.json)
_HEX64 = frozenset("0123456789abcdef")
_REMEMBER_BYTES = 256 << 20  # files this large have their sha256 kept across processes


def _file_digest(f: Path) -> str:
    """sha256 of a weight file: free for a hub-cache blob (named by its sha256), else computed once
    per file version and remembered in ``<waitlens cache>/sha256.json`` (a 32B model is 64 GB)."""
    real = f.resolve()
    if len(real.name) == 64 and set(real.name) <= _HEX64 and real.parent.name == "blobs":
        return real.name
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    if key in _DIGESTS:
        return _DIGESTS[key]
    if st.st_size < _REMEMBER_BYTES:  # cheap to hash again: not worth a line in the book
        _DIGESTS[key] = sha256_file(real)
        return _DIGESTS[key]
    from waitlens.hooks.models import cache_dir

    book = cache_dir() / "sha256.json"
    try:
        known = json.loads(book.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = sha256_file(real)
        try:
            book.parent.mkdir(parents=True, exist_ok=True)
            write_json(book, known)
        except OSError:  # a read-only cache: remember it for this process only
            pass
    _DIGESTS[key] = known[key]
    return known[key]


def _weight_files(model) -> list[Path]:
    source = getattr(model, "source_dir", None)
    if source is None:  # a hub model: its snapshot in the local hub cache, if there
        try:
            from huggingface_hub import snapshot_download

            source = snapshot_download(model.spec, revision=getattr(model, "revision", None), local_files_only=True)
        except Exception:  # not cached, or not a hub id: fall back to the parameters
            return []
    return sorted(p for p in Path(source).iterdir() if p.suffix in WEIGHT_SUFFIXES)


def weights_sha256(model: LoadedModel) -> str:
    """A sha256 naming the model's weights: over its weight files (name + sha256 of each) when they
    are on disk (a local directory, the hub cache), else over its parameters and buffers as loaded."""
    files = _weight_files(model)
    h = hashlib.sha256()
    if files:
        for f in files:
            h.update(f.name.encode() + b"\0" + _file_digest(f).encode() + b"\n")
        return h.hexdigest()
    for name, t in model.hf.state_dict().items():
        h.update(name.encode() + b"\0" + str(t.dtype).encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_identity(model: LoadedModel) -> dict[str, str]:
    """What a store's states came from, beyond the spec: the weights and the compute dtype."""
    return {"weights_sha256": weights_sha256(model), "compute_dtype": str(model.dtype).removeprefix("torch.")}


def shard_problem(store_dir: Path, entry: dict[str, Any], *, checksum: bool = True,
                  layers: int | None = None, d_model: int | None = None) -> str | None:
    """What is wrong with one shard on disk (None: it is what the manifest says)."""
    path = store_dir / entry["file"]
    if not path.is_file():
        return f"{path.name} is missing"
    size = path.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        return f"{path.name} has {size} bytes, the manifest says {entry['bytes']}"
    try:
        with safe_open(str(path), framework="pt") as f:
            shape = list(f.get_slice(TENSOR).get_shape())
            fingerprint = (f.metadata() or {}).get("fingerprint")
    except Exception as e:  # a truncated or foreign file
        return f"{path.name} is not a readable shard ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    want = [entry["n"], layers, d_model]
    if len(shape) != 3 or any(w is not None and w != g for w, g in zip(want, shape, strict=False)):
        return f"{path.name} holds states of shape {shape}, the manifest says [{entry['n']}, {layers}, {d_model}]"
    if entry.get("fingerprint") and fingerprint != entry["fingerprint"]:
        return f"{path.name} was written for other trajectories/positions (fingerprint {fingerprint})"
    if checksum and "sha256" in entry and sha256_file(path) != entry["sha256"]:
        return f"{path.name} does not match its sha256 in the manifest (corrupted)"
    return None


def shard_fingerprint(path: Path) -> str | None:
    """The fingerprint a finished shard file was written with (None if unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except Exception:  # a truncated or foreign file: treat as not done
        return None


def merge_metadata(out_dir: Path, shards: Sequence[dict]) -> pd.DataFrame:
    parts = [read_metadata(out_dir / s["file"].replace(".safetensors", ".csv")) for s in shards]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def read_metadata(path: Path) -> pd.DataFrame:
    """A metadata csv with its column types restored (ids stay strings, `correct` stays bool)."""
    head = pd.read_csv(path, nrows=0).columns
    table = pd.read_csv(path, dtype={c: str for c in _STR_COLUMNS if c in head}, keep_default_na=False,
                        na_values={c: [""] for c in head if c not in _STR_COLUMNS})
    if "correct" in table:
        table["correct"] = _bool_column(table["correct"])
    return table


def _bool_column(col: pd.Series) -> pd.Series:
    if col.dtype == bool:
        return col
    mapped = col.map(lambda v: {"True": True, "False": False, True: True, False: False}.get(v, pd.NA))
    return mapped.astype(bool) if not mapped.isna().any() else mapped.astype("boolean")


# -- reading ----------------------------------------------------------------------------------
class ActivationStore:
    """A finished activation store on disk; states are read lazily, only the shards needed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.is_file():
            what = "does not exist" if not self.path.exists() else "has no manifest.json"
            raise StoreError(f"{self.path} is not an activation store ({what}); create one with `waitlens capture`")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{mpath}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath}: unknown store format {self.manifest.get('format')!r}; expected {FORMAT!r}")
        if not self.manifest.get("complete"):
            done = sum((self.path / s["file"]).is_file() for s in self.manifest.get("shards", []))
            raise IncompleteStoreError(
                f"{self.path}: the capture was interrupted ({done} of {len(self.manifest.get('shards', []))} "
                "shards written); rerun the same capture command with this --out to resume it"
            )
        self._dtype = storage_dtype(self.manifest["dtype"])
        self._verified: set[int] = set()  # shards whose sha256 was checked
        problems = self.problems(checksum=False)  # sizes, shapes, row counts: cheap
        if problems:
            raise StoreError(f"{self.path}: {problems[0]}{_more(problems)}; {_REPAIR}")

    def problems(self, *, checksum: bool = True) -> list[str]:
        """Every way the files differ from the manifest (empty: the store is intact)."""
        shards = self.manifest.get("shards", [])
        out = [p for s in shards if (p := shard_problem(self.path, s, checksum=checksum,
                                                        layers=len(self.layers), d_model=self.d_model))]
        total = sum(int(s["n"]) for s in shards)
        if total != len(self):
            out.append(f"the shards hold {total} rows, the manifest says n_positions {len(self)}")
        mpath = self.path / METADATA
        if not mpath.is_file():
            out.append(f"{METADATA} is missing")
        elif checksum and "metadata_sha256" in self.manifest and sha256_file(mpath) != self.manifest["metadata_sha256"]:
            out.append(f"{METADATA} does not match its sha256 in the manifest (edited or corrupted)")
        return out

    def verify(self) -> int:
        """Check every shard's size, shape and sha256 and the metadata; raises StoreError listing
        what is wrong. Returns the number of bytes checked."""
        problems = self.problems(checksum=True)
        if not problems:
            try:
                self.metadata  # noqa: B018 (row order, row count)
            except StoreError as e:
                problems = [str(e).removeprefix(f"{self.path}: ")]
        if problems:
            raise StoreError(f"{self.path}: {problems[0]}{_more(problems)}; {_REPAIR}")
        self._verified = set(range(len(self.manifest.get("shards", []))))
        files = [self.path / s["file"] for s in self.manifest.get("shards", [])] + [self.path / METADATA]
        return sum(f.stat().st_size for f in files)

    # -- facts ---------------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @property
    def hook(self) -> str:
        return self.manifest["hook"]

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def d_model(self) -> int:
        return int(self.manifest["d_model"])

    @property
    def hook_names(self) -> list[str]:
        return [f"blocks.{layer}.hook_{self.hook}" for layer in self.layers]

    def __len__(self) -> int:
        return int(self.manifest["n_positions"])

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, model={self.model!r}, hook={self.hook!r}, "
                f"n_positions={len(self)}, layers={self.layers})")

    @cached_property
    def metadata(self) -> pd.DataFrame:
        """One row per position: Positions columns + `model`, `shard`, `row`."""
        path = self.path / METADATA
        if "metadata_sha256" in self.manifest and sha256_file(path) != self.manifest["metadata_sha256"]:
            raise StoreError(f"{self.path}: {METADATA} does not match its sha256 in the manifest (edited or "
                             f"corrupted); {_REPAIR}")
        table = read_metadata(path)
        if len(table) != len(self):
            raise StoreError(f"{self.path}: metadata.csv has {len(table)} rows, manifest says {len(self)}")
        if "row" in table and not np.array_equal(table["row"].to_numpy(), np.arange(len(table))):
            bad = int(np.flatnonzero(table["row"].to_numpy() != np.arange(len(table)))[0])
            raise StoreError(f"{self.path}: {METADATA} line {bad + 2} holds row {table['row'].iloc[bad]}, not {bad} "
                             f"(rows reordered: they would be paired with other states); {_REPAIR}")
        return table

    @property
    def meta(self) -> pd.DataFrame:
        """The metadata table (one row per position, in step with `states()`)."""
        return self.metadata

    # -- states --------------------------------------------------------------------------------
    def _layer_index(self, layers) -> list[int]:
        if layers is None:
            return list(range(len(self.layers)))
        if isinstance(layers, int):
            layers = [layers]
        where = {layer: i for i, layer in enumerate(self.layers)}
        missing = [x for x in layers if int(x) not in where]
        if missing:
            raise ValueError(f"layer(s) {missing} not in this store; it holds layers {self.layers}")
        return [where[int(x)] for x in layers]

    def states(
        self, layers: Sequence[int] | int | None = None, rows: Sequence[int] | np.ndarray | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Float[Tensor, "n layer d_model"]:
        """States for `rows` (global row indices, default all) at `layers` (layer numbers,
        default all stored), as `dtype`. Only the shards holding those rows are read."""
        li = self._layer_index(layers)
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range: the store has {len(self)} rows")
        out = torch.empty((rows.size, len(li), self.d_model), dtype=dtype)
        if rows.size == 0:
            return out
        starts = np.cumsum([0] + [s["n"] for s in self.manifest["shards"]])
        shard_of = np.searchsorted(starts, rows, side="right") - 1
        l0, l1 = min(li), max(li) + 1  # read only the span of layers asked for, not every layer
        lidx = torch.tensor(li) - l0
        for k in np.unique(shard_of):
            pick = np.flatnonzero(shard_of == k)
            local = rows[pick] - starts[k]
            lo, hi = int(local.min()), int(local.max()) + 1
            self._check_shard(int(k))
            with safe_open(str(self.path / self.manifest["shards"][k]["file"]), framework="pt") as f:
                block = f.get_slice(TENSOR)[lo:hi, l0:l1]
            sel = block[torch.from_numpy(local - lo)].index_select(1, lidx)
            out[torch.from_numpy(pick)] = sel.to(dtype)
        return out

    def _check_shard(self, k: int) -> None:
        """Its sha256, the first time shard `k` is read."""
        if k in self._verified:
            return
        entry = self.manifest["shards"][k]
        problem = shard_problem(self.path, entry, layers=len(self.layers), d_model=self.d_model)
        if problem:
            raise StoreError(f"{self.path}: {problem}; {_REPAIR}")
        self._verified.add(k)

    def select(
        self, words: Sequence[str] | str | None = None, layers: Sequence[int] | int | None = None,
        model: str | None = None, correct: bool | None = None, dtype: torch.dtype = torch.float32,
    ) -> tuple[Float[Tensor, "n layer d_model"], pd.DataFrame]:
        """(states, metadata) for the positions matching every given filter.

        words: lexicon words (``"<control>"`` for control positions); layers: layer numbers;
        model: the model spec (a store holds one model: a different one is an error);
        correct: only positions of correct (True) or incorrect (False) trajectories.
        The metadata's index runs 0..n-1 in step with the states; `row` keeps the global row.
        """
        meta = self.metadata
        keep = np.ones(len(meta), dtype=bool)
        if model is not None and model != self.model:
            raise ValueError(f"{self.path} holds model {self.model!r}, not {model!r}")
        if words is not None:
            words = [words] if isinstance(words, str) else list(words)
            known = set(self.manifest.get("lexicon", [])) | set(meta["word"])
            unknown = [w for w in words if w.lower() not in known]
            if unknown:
                raise ValueError(f"word(s) {unknown} not in this store; it holds {sorted(known)}")
            keep &= meta["word"].isin([w.lower() for w in words]).to_numpy()
        if correct is not None:
            keep &= (meta["correct"] == bool(correct)).fillna(False).to_numpy(dtype=bool)
        rows = np.flatnonzero(keep)
        return self.states(layers, rows, dtype), meta.iloc[rows].reset_index(drop=True)


_REPAIR = "rerun the capture command with this --out to recapture what is damaged (or delete the store)"


def _more(problems: list[str]) -> str:
    return f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""


def open_store(path: str | os.PathLike) -> ActivationStore:
    """A finished store (`.states(layers, rows)`, `.meta`, `.select(...)`); checked on open."""
    return ActivationStore(path)


def finish_manifest(store_dir: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Fill in what a complete store's manifest records: each shard's bytes and sha256 (hashing
    a shard written by an earlier, killed run), the metadata's sha256, `complete: true`."""
    for entry in manifest["shards"]:
        if "sha256" not in entry:
            entry.update(file_facts(store_dir / entry["file"]))
    manifest["metadata_sha256"] = sha256_file(store_dir / METADATA)
    manifest["complete"] = True
    return manifest


# -- writing a whole store at once ------------------------------------------------------------
def write_store(
    out_dir: str | os.PathLike,
    states: Float[Tensor, "n layer d_model"],
    metadata: pd.DataFrame,
    manifest_extra: dict[str, Any] | None = None,
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> ActivationStore:
    """Write in-memory states + metadata as a one-shard store (atomically: the directory
    appears complete or not at all). For synthetic stores and results computed in memory.

    `metadata` needs the columns in `REQUIRED_COLUMNS`; `manifest_extra` sets/overrides
    manifest keys (``model``, ``layers``, ``hook``, ``lexicon``, ...).
    """
    out = Path(out_dir)
    if states.ndim != 3:
        raise ValueError(f"states must be [n_positions, n_layers, d_model], got shape {tuple(states.shape)}")
    if len(metadata) != states.shape[0]:
        raise ValueError(f"metadata has {len(metadata)} rows but states has {states.shape[0]}")
    missing = [c for c in REQUIRED_COLUMNS if c not in metadata.columns]
    if missing:
        raise ValueError(f"metadata lacks column(s) {missing}; required: {list(REQUIRED_COLUMNS)}")
    extra = dict(manifest_extra or {})
    n, n_layers, d = states.shape
    model = extra.get("model") or (str(metadata["model"].iloc[0]) if "model" in metadata and n else "unknown")
    manifest = {
        "format": FORMAT, "model": model, "revision": None, "hook": "resid_post",
        "layers": list(range(n_layers)), "d_model": int(d), "dtype": dtype, "lexicon": [],
        "prompt_format": None, "n_positions": int(n), "shards": [], "complete": True,
        "versions": versions(), "created": now(),
    }
    manifest.update(extra)
    manifest.update({"model": model, "n_positions": int(n), "d_model": int(d), "complete": True})
    if len(manifest["layers"]) != n_layers:
        raise ValueError(f"manifest layers {manifest['layers']} do not match the {n_layers} layers of states")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True or use another directory")
    with atomic_dir(out) as tmp:
        meta = metadata.reset_index(drop=True).copy()
        meta["model"] = model
        meta["shard"] = 0
        meta["row"] = np.arange(n, dtype=np.int64)
        entry = write_shard(tmp, 0, states.detach().to("cpu", storage_dtype(dtype)), meta)
        manifest["shards"] = [entry]
        write_csv(tmp / METADATA, meta)
        write_json(tmp / MANIFEST, finish_manifest(tmp, manifest))
    return ActivationStore(out)
