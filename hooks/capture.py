"""Capture residual-stream states at chosen token positions, streamed to an activation store.

How it stays as cheap as the model's own forward:

- It runs the plain HF model (`LoadedModel.hf`) with its own fast attention (sdpa), not the
  TransformerLens bridge (which forces eager, O(T²)-memory attention). The hook points are
  the same tensors TransformerLens names `blocks.{l}.hook_resid_pre/post` (see hooks.points;
  tests check the numbers against `bridge.run_with_cache`).
- Each hook keeps only the requested token positions (`index_select`), so what is held is
  positions × layers × d_model, never sequence × layers × d_model.
- It calls the decoder without its LM head (no full-vocabulary logits) and stops the
  forward (`StopForward`) right after the last requested layer.

Trajectories are grouped into shards of a fixed, deterministic set of trajectories; each
finished shard is committed atomically, so a killed capture resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import no_type_check

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from waitlens.hooks.batching import MAX_BATCH_TOKENS, length_batches
from waitlens.hooks.models import LoadedModel
from waitlens.hooks.points import (
    StopForward,
    hook_name,
    normalize_kind,
    residual_hooks,
    resolve_layers,
)
from waitlens.hooks.store import (
    FORMAT,
    MANIFEST,
    METADATA,
    ActivationStore,
    StoreError,
    finish_manifest,
    merge_metadata,
    model_identity,
    now,
    shard_name,
    shard_problem,
    versions,
    write_csv,
    write_json,
    write_shard,
)
from waitlens.hooks.store import storage_dtype as parse_storage_dtype
from waitlens.traces.positions import COLUMNS, Positions
from waitlens.traces.trajectory import Trajectory

# Sub-batches are capped in padded tokens (hooks.batching), so long trajectories run one at a time.


@dataclass
class _Shard:
    index: int
    trajectory_ids: list[str]
    table: pd.DataFrame  # its positions, in store order, with `row` set
    fingerprint: str


def capture_residuals(
    model: LoadedModel,
    trajectories: Sequence[Trajectory],
    positions: Positions | pd.DataFrame,
    out_dir: str | Path,
    layers: Sequence[int] | str | None = None,
    *,
    hook: str = "resid_post",
    batch_size: int = 8,
    storage_dtype: str = "float32",
    shard_size: int = 64,
    progress: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
) -> ActivationStore:
    """Capture `blocks.{l}.hook_{hook}` at every position in `positions`, for `layers`
    (default all), into an activation store at `out_dir`; returns the finished store.

    positions: a `traces.Positions` (or its table) computed with this model's tokenizer.
    shard_size: trajectories per shard (the unit of resume); batch_size: trajectories per
    forward pass (right-padded; capped at `MAX_BATCH_TOKENS` padded tokens).
    Rerunning with the same arguments on an interrupted `out_dir` resumes it; on a finished
    one it returns the store; a different configuration there is an error.
    Everything is validated before anything is written.

    Data-parallel (``torchrun --nproc-per-node N``, read from ``RANK``/``WORLD_SIZE`` unless
    given; a gloo process group is started if none is): rank r captures the shards whose index
    is r mod N, rank 0 writes the manifest and metadata, and the finished store is byte for
    byte the one a single process writes (manifest timestamps apart). Rerunning resumes.
    """
    rank, world = _world(rank, world_size)
    out = Path(out_dir)
    kind = normalize_kind(hook)
    layer_list = resolve_layers(layers, model.n_layers)
    sdtype = parse_storage_dtype(storage_dtype)
    if batch_size < 1 or shard_size < 1:
        raise ValueError("batch_size and shard_size must be at least 1")
    pos = positions if isinstance(positions, Positions) else Positions(positions)
    table = pos.table
    ids_by_traj = _tokenize_all(model, trajectories)
    _check_positions(table, ids_by_traj)

    shards = _plan(trajectories, table, ids_by_traj, shard_size, model.spec)
    manifest = {
        "format": FORMAT, "model": model.spec, "revision": model.revision, "hook": kind,
        "layers": layer_list, "d_model": model.d_model, "dtype": storage_dtype,
        "lexicon": list(pos.lexicon), "prompt_format": model.format.to_dict(), **model_identity(model),
        "n_positions": len(table), "shard_size": shard_size,
        "shards": [{"file": f"{shard_name(s.index)}.safetensors", "n": len(s.table), "fingerprint": s.fingerprint}
                   for s in shards],
        "complete": False, "versions": versions(), "created": now(),
    }
    existing = _existing_manifest(out)
    old_entries: dict[str, dict] = {}
    if existing is not None:
        _check_resume(out, existing, manifest)
        old_entries = {s["file"]: s for s in existing.get("shards", [])}
        if existing.get("complete"):
            try:
                ActivationStore(out).verify()
                return ActivationStore(out)
            except StoreError:  # a damaged shard or metadata: recapture what fails its checks
                pass
        manifest["created"] = existing.get("created", manifest["created"])
    if table.empty:
        warnings.warn(f"no positions to capture; writing an empty store at {out}", stacklevel=2)

    out.mkdir(parents=True, exist_ok=True)
    todo = []
    for s, entry in zip(shards, manifest["shards"], strict=True):  # a shard is done if it passes its checks
        old = {**old_entries.get(entry["file"], {}), **entry}
        if shard_problem(out, old, layers=len(layer_list), d_model=model.d_model) is None:
            entry.update({k: old[k] for k in ("bytes", "sha256") if k in old})
        else:
            todo.append(s)
    _barrier(world)  # every rank has read the old state before rank 0 writes
    if rank == 0:
        write_json(out / MANIFEST, manifest)
    # this rank's share of the shards (other ranks' shards get their bytes and sha256 from
    # finish_manifest on rank 0)
    todo = [s for s in todo if s.index % world == rank]
    mine = [s for s in shards if s.index % world == rank]
    total = sum(len(s.trajectory_ids) for s in mine)
    bar = _progress(progress, total=total, initial=total - sum(len(s.trajectory_ids) for s in todo))
    try:
        for shard in todo:
            states = _capture_shard(model, shard, ids_by_traj, layer_list, kind, batch_size, bar)
            entry = write_shard(out, shard.index, states.to(sdtype), shard.table, shard.fingerprint)
            if rank == 0:
                manifest["shards"][shard.index].update(entry)  # its size and sha256, for the checks
                write_json(out / MANIFEST, manifest)
    finally:
        if bar is not None:
            bar.close()
    _barrier(world)  # every shard is on disk
    if rank == 0:
        meta = merge_metadata(out, manifest["shards"]) if shards else _empty_metadata()
        write_csv(out / METADATA, meta)
        write_json(out / MANIFEST, finish_manifest(out, manifest))
    _barrier(world)  # the store is complete
    return ActivationStore(out)


def _world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world size): as given, else torchrun's RANK/WORLD_SIZE; starts a gloo group if needed."""
    import os

    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", 1))
    r = int(rank if rank is not None else os.environ.get("RANK", 0))
    if world < 1 or not 0 <= r < world:
        raise ValueError(f"rank {r} is not in a world of {world} process(es)")
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            if "MASTER_ADDR" not in os.environ:
                raise ValueError(f"world_size {world} needs a launcher (torchrun sets MASTER_ADDR, RANK, WORLD_SIZE)")
            dist.init_process_group("gloo", rank=r, world_size=world)
        if dist.get_world_size() != world or dist.get_rank() != r:
            raise ValueError(f"rank {r} of {world} differs from the process group's "
                             f"{dist.get_rank()} of {dist.get_world_size()}")
    return r, world


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


@dataclass
class Captured:
    """In-memory residual states (`capture`): ``states[i]`` is the state at ``meta.iloc[i]``.

    Unpacks as ``states, meta = capture(...)``."""

    states: Float[Tensor, "n layer d_model"]
    meta: pd.DataFrame  # the positions in store order, with model and row
    layers: list[int]
    hook: str

    def __iter__(self):
        return iter((self.states, self.meta))

    def __len__(self) -> int:
        return len(self.meta)


def capture(
    model: LoadedModel,
    trajectories: Sequence[Trajectory],
    positions: Positions | pd.DataFrame,
    layers: Sequence[int] | str | None = None,
    *,
    hook: str = "resid_post",
    batch_size: int = 8,
    progress: bool = False,
) -> Captured:
    """`blocks.{l}.hook_{hook}` at every position in `positions`, for `layers` (default all),
    held in memory (float32) for a notebook: the same forwards and the same row order as
    `capture_residuals` writes to a store (TransformerLens's `run_with_cache` habit, at the
    chosen positions only). ``states, meta = capture(model, trajs, pos, layers=[3, 5])``.
    """
    kind = normalize_kind(hook)
    layer_list = resolve_layers(layers, model.n_layers)
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    pos = positions if isinstance(positions, Positions) else Positions(positions)
    table = pos.table
    ids_by_traj = _tokenize_all(model, trajectories)
    _check_positions(table, ids_by_traj)
    shards = _plan(trajectories, table, ids_by_traj, max(len(ids_by_traj), 1), model.spec)
    if not shards:
        return Captured(torch.empty((0, len(layer_list), model.d_model)), _empty_metadata(), layer_list, kind)
    shard = shards[0]
    bar = _progress(progress, total=len(shard.trajectory_ids), initial=0)
    try:
        states = _capture_shard(model, shard, ids_by_traj, layer_list, kind, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    return Captured(states, shard.table.reset_index(drop=True), layer_list, kind)


# -- forward passes ---------------------------------------------------------------------------
@torch.inference_mode()
def residuals_at(
    model: LoadedModel,
    input_ids: Sequence[Int[Tensor, " _pos"]],
    token_indices: Sequence[Sequence[int] | Int[np.ndarray, " _n"]],
    layers: Sequence[int],
    hook: str = "resid_post",
) -> list[Float[Tensor, "_n layer d_model"]]:
    """One padded forward over `input_ids` (a batch of 1-D id tensors); for each sequence,
    the residual states at its `token_indices` for `layers`, on the CPU in the model dtype."""
    kind = normalize_kind(hook)
    lengths = [len(x) for x in input_ids]
    T = max(lengths)
    device = model.device
    batch = torch.zeros((len(input_ids), T), dtype=torch.long)
    for b, x in enumerate(input_ids):
        batch[b, : len(x)] = x
    padded = any(n != T for n in lengths)
    mask = None
    if padded:  # right padding: real tokens keep their positions and never see the pads
        mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long().to(device)
    flat = torch.cat([b * T + torch.as_tensor(list(ix), dtype=torch.long) for b, ix in enumerate(token_indices)])
    flat = flat.to(device)
    got: dict[int, Tensor] = {}
    last = max(layers)

    @no_type_check
    def grab(layer):
        def fn(hidden):
            got[layer] = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat).to("cpu")
            if layer == last:
                raise StopForward
            return None

        return fn

    decoder = getattr(model.hf, "base_model", model.hf)  # no LM head, no full-vocab logits
    with residual_hooks(model, {hook_name(layer, kind): grab(layer) for layer in layers}):
        try:
            decoder(input_ids=batch.to(device), attention_mask=mask, use_cache=False)
        except StopForward:
            pass
    stacked = torch.stack([got[layer] for layer in layers], dim=1)  # [n, layer, d]
    return list(stacked.split([len(ix) for ix in token_indices]))


def _capture_shard(model, shard: _Shard, ids_by_traj, layers, kind, batch_size, bar) -> Tensor:
    out = torch.empty((len(shard.table), len(layers), model.d_model), dtype=torch.float32)
    rows_by_traj = {tid: np.flatnonzero(shard.table["trajectory_id"].to_numpy() == tid) for tid in shard.trajectory_ids}
    for group in _batches(shard.trajectory_ids, ids_by_traj, batch_size):
        idx = [shard.table["token_index"].to_numpy()[rows_by_traj[t]] for t in group]
        states = residuals_at(model, [ids_by_traj[t] for t in group], idx, layers, kind)
        for t, s in zip(group, states, strict=True):
            out[torch.from_numpy(rows_by_traj[t])] = s.float()
        if bar is not None:
            bar.update(len(group))
    return out


def _batches(trajectory_ids, ids_by_traj, batch_size: int):
    """Trajectory ids in groups sorted by length (less padding), capped in padded tokens."""
    tids = list(trajectory_ids)
    for group in length_batches([len(ids_by_traj[t]) for t in tids], batch_size, MAX_BATCH_TOKENS):
        yield [tids[i] for i in group]


# -- validation and planning ------------------------------------------------------------------
def _tokenize_all(model, trajectories: Sequence[Trajectory]) -> dict[str, Tensor]:
    """Token ids of every trajectory (raises ContextLengthError for one that is too long)."""
    out: dict[str, Tensor] = {}
    for t in trajectories:
        if t.id in out:
            raise ValueError(f"duplicate trajectory id {t.id!r}")
        out[t.id] = model.tokenize(t)
    return out


def _check_positions(table: pd.DataFrame, ids_by_traj: dict[str, Tensor]) -> None:
    unknown = sorted(set(table["trajectory_id"]) - set(ids_by_traj))
    if unknown:
        raise ValueError(f"positions refer to {len(unknown)} trajectory id(s) not given, e.g. {unknown[:3]}")
    n_tok = table["trajectory_id"].map(lambda t: len(ids_by_traj[t]))
    bad = table[(table["token_index"] < 0) | (table["token_index"] >= n_tok)]
    if len(bad):
        r = bad.iloc[0]
        raise ValueError(
            f"{len(bad)} position(s) outside their trajectory, e.g. token {r['token_index']} of "
            f"{r['trajectory_id']!r} ({len(ids_by_traj[r['trajectory_id']])} tokens); were the positions "
            "found with this model's tokenizer and prompt format?"
        )


def _plan(trajectories, table: pd.DataFrame, ids_by_traj, shard_size: int, spec: str) -> list[_Shard]:
    """Shards of `shard_size` consecutive trajectories (those with positions, in input order)."""
    groups = {tid: g for tid, g in table.groupby("trajectory_id", sort=False)}
    with_pos = [t.id for t in trajectories if t.id in groups]
    shards, row = [], 0
    for k in range(0, len(with_pos), shard_size):
        tids = with_pos[k : k + shard_size]
        part = pd.concat([groups[t] for t in tids], ignore_index=True)[list(COLUMNS) + _extra_cols(table)]
        part["model"] = spec
        part["shard"] = k // shard_size
        part["row"] = np.arange(row, row + len(part), dtype=np.int64)
        row += len(part)
        h = hashlib.sha256()
        for t in tids:
            h.update(t.encode() + b"\0" + hashlib.sha256(ids_by_traj[t].numpy().tobytes()).digest())
        h.update(part[["trajectory_id", "token_index", "word", "row"]].to_csv(index=False).encode())
        shards.append(_Shard(k // shard_size, tids, part, h.hexdigest()[:16]))
    return shards


def _extra_cols(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c not in COLUMNS and c not in ("model", "shard", "row")]


def _empty_metadata() -> pd.DataFrame:
    return pd.DataFrame(columns=list(COLUMNS) + ["model", "shard", "row"])


# -- resume -----------------------------------------------------------------------------------
CONFIG_KEYS = ("format", "model", "revision", "hook", "layers", "d_model", "dtype", "lexicon",
               "prompt_format", "weights_sha256", "compute_dtype", "n_positions", "shard_size")


def _existing_manifest(out: Path) -> dict | None:
    if not out.exists():
        return None
    if not out.is_dir():
        raise StoreError(f"--out {out} exists and is not a directory")
    mpath = out / MANIFEST
    if not mpath.is_file():
        if any(out.iterdir()):
            raise StoreError(f"{out} exists, is not empty and is not an activation store; use a new or empty directory")
        return None
    try:
        return json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise StoreError(f"{mpath}: unreadable manifest ({e}); delete {out} and capture again") from None


def _check_resume(out: Path, old: dict, new: dict) -> None:
    diff = [k for k in CONFIG_KEYS if old.get(k) != new.get(k)]
    old_fp = [s.get("fingerprint") for s in old.get("shards", [])]
    new_fp = [s["fingerprint"] for s in new["shards"]]
    if not diff and old_fp != new_fp:
        diff = ["trajectories/positions"]
    if diff:
        detail = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff if k in CONFIG_KEYS)
        raise StoreError(
            f"{out} holds a capture with a different configuration ({detail or diff[0] + ' differ'}); "
            "use another --out directory, or delete this one to start over"
        )


def _progress(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="traj", desc="capture")
