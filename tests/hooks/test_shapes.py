"""The jaxtyping shapes on public tensor functions are checked while the tests run: pyproject's
pytest addopts installs jaxtyping's import hook (with beartype) for the annotated modules, so a
wrong-shaped tensor fails at the call with jaxtyping's error. Without the hook these tests fail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from jaxtyping import TypeCheckError

from waitlens.hooks.capture import residuals_at
from waitlens.hooks.store import write_store
from waitlens.probes.solver import fit_logistic_batched


def test_solver_rejects_rows_that_disagree():
    X = torch.randn(2, 10, 3, dtype=torch.float64)  # layer n d, n = 10
    Y = torch.ones(9, 4, dtype=torch.float64)  # n q with n = 9
    M = torch.ones(10, 4, dtype=torch.float64)
    lam = torch.ones(4, dtype=torch.float64)
    with pytest.raises(TypeCheckError, match=r"fit_logistic_batched(.|\n)*parameter 'Y'"):
        fit_logistic_batched(X, Y, M, lam)


def test_write_store_rejects_states_without_a_layer_axis(tmp_path):
    states = torch.zeros(3, 8)  # [n, d_model]: the layer axis is missing
    meta = pd.DataFrame({"trajectory_id": ["a", "b", "c"]})
    with pytest.raises(TypeCheckError, match=r"write_store(.|\n)*parameter 'states'"):
        write_store(tmp_path / "store", states, meta)
    assert not (tmp_path / "store").exists()


def test_residuals_at_rejects_a_2d_sequence(tiny_model):
    ids = torch.arange(4, 12)[None, :]  # [1, pos]: each element must be 1-D
    with pytest.raises(TypeCheckError, match=r"residuals_at(.|\n)*parameter 'input_ids'"):
        residuals_at(tiny_model, [ids], [np.array([0, 1])], [0])


def test_residuals_at_accepts_ragged_ids_and_numpy_indices(tiny_model):
    ids = [torch.arange(4, 4 + n) for n in (5, 9, 7)]  # one length per sequence
    got = residuals_at(tiny_model, ids, [np.array([0, 4]), [1, 2, 8], np.array([6])], [0, 1])
    assert [tuple(t.shape) for t in got] == [(2, 2, 32), (3, 2, 32), (1, 2, 32)]
