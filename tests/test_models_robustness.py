"""Every registered model on the batches users build at the edges: one-atom systems, graphs
without edges, atoms on top of each other, zero velocities, a single output time, systems of very
different sizes in one batch, coordinates far from the origin; plus determinism and the state
dict round trip."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from surrogate_md import testing as H
from surrogate_md.data import keys as K
from surrogate_md.models import MODELS, build_model
from surrogate_md.models import layers as L

SMALL = (("hidden", 16), ("n_layers", 2), ("n_decoder_layers", 2), ("n_history", 3))


def _model(name: str, n_channels: int = 1, dtype: torch.dtype = torch.float64):
    """A small perturbed model (non-trivial outputs) with normalisation set."""
    fields = {f.name for f in dataclasses.fields(MODELS[name].config_class)}
    options = {k: v for k, v in SMALL if k in fields}
    model = build_model(name, {"n_channels": n_channels, **options}).to(dtype)
    model.set_normalisation(velocity_scale=2.0, displacement_scale=0.3, time_scale=0.4)
    H.perturb_parameters(model, seed=1)
    return model


def _batch(model, **kwargs):
    return H.random_batch(n_channels=model.config.n_channels,
                          history=getattr(model.config, "n_history", 3), **kwargs)


def _radius_graph(batch: H.Batch, cutoff: float) -> H.Batch:
    """Replace the edges by those between nodes of one system closer than ``cutoff`` Å (channel
    means), all of type 0."""
    centre = batch[K.POS].mean(dim=1)
    graph = batch[K.GRAPH]
    near = (torch.cdist(centre, centre) < cutoff) & (graph[:, None] == graph[None, :])
    near.fill_diagonal_(False)
    dst, src = near.nonzero().T
    out = dict(batch)
    out[K.EDGE_INDEX] = torch.stack([src, dst])
    out[K.EDGE_TYPE] = torch.zeros(src.shape[0], dtype=torch.long)
    return out


def _stack_nodes(batch: H.Batch, target: int, source: int) -> H.Batch:
    """Put node ``target`` exactly on node ``source`` (positions and history)."""
    out = dict(batch)
    out[K.POS] = batch[K.POS].clone()
    out[K.POS][target] = batch[K.POS][source]
    if K.HIST in batch:
        out[K.HIST] = batch[K.HIST].clone()
        out[K.HIST][:, target] = batch[K.HIST][:, source]
    return out


def _edge_cases(model) -> dict[str, H.Batch]:
    zero_vel = _batch(model, n_atoms=(5, 7))
    zero_vel[K.VEL] = torch.zeros_like(zero_vel[K.VEL])
    return {
        "one atom": _batch(model, n_atoms=1),
        "one atom beside five": _batch(model, n_atoms=(1, 5), seed=1),
        "no edges": _radius_graph(_batch(model, n_atoms=(5, 7), seed=2), cutoff=1e-3),
        "duplicate positions": _stack_nodes(_batch(model, n_atoms=(5, 7), seed=3), 1, 0),
        "zero velocities": zero_vel,
        "one output time": _batch(model, n_atoms=(3, 4), n_times=1, seed=4),
    }


def _assert_finite_gradients(model, batch: H.Batch, what: str) -> None:
    """Outputs, and gradients with respect to parameters and input vectors, are finite."""
    batch = dict(batch)
    inputs = [k for k in (K.POS, K.VEL, K.HIST) if k in batch]
    for key in inputs:
        batch[key] = batch[key].clone().requires_grad_(True)
    out = model(batch)
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    wrt = [batch[k] for k in inputs] + [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.square().sum(), wrt, allow_unused=True)
    for g in grads:
        assert g is None or torch.isfinite(g).all(), f"{what}: non-finite gradient"


@pytest.mark.parametrize("n_channels", [1, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_edge_case_batches_are_finite_equivariant_and_batch_independent(name, n_channels):
    model = _model(name, n_channels)
    for what, batch in _edge_cases(model).items():
        out = model(batch)
        n_times = batch[K.TIMES].shape[0]
        assert out.shape == (n_times, *batch[K.POS].shape), what
        _assert_finite_gradients(model, batch, what)
        H.check_equivariance(model, batch, seed=5)
        H.check_batch_independence(model, batch)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_all_atoms_on_one_point_gives_finite_gradients(name):
    """Every relative vector is zero: norms, normalised Gram matrices and spectra at zero."""
    model = _model(name, n_channels=4)
    batch = _batch(model, n_atoms=(4, 3))
    batch[K.POS] = batch[K.POS][:1, :1].expand_as(batch[K.POS]).clone()
    if K.HIST in batch:
        batch[K.HIST] = batch[K.HIST][:, :1, :1].expand_as(batch[K.HIST]).clone()
    _assert_finite_gradients(model, batch, "all atoms on one point")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_small_and_large_systems_in_one_batch(name):
    """2, 500 and 1 atoms on a radius graph: each system's outputs equal those it gets alone."""
    model = _model(name)
    batch = _radius_graph(_batch(model, n_atoms=(2, 500, 1), seed=6), cutoff=1.0)
    H.check_batch_independence(model, batch)


@pytest.mark.parametrize("name", ["egnn", "egno", "estag", "painet"])
def test_chunked_edge_pass_on_edge_cases(name, monkeypatch):
    """The chunked, recomputed edge pass of large graphs matches the plain pass, values and
    gradients, with a one-atom system and two atoms on one point in the batch."""
    model = _model(name, n_channels=4)
    batch = _stack_nodes(_batch(model, n_atoms=(1, 6, 5), seed=7), 2, 1)

    def run():
        inputs = dict(batch)
        inputs[K.POS] = batch[K.POS].clone().requires_grad_(True)
        out = model(inputs)
        grads = torch.autograd.grad(out.square().sum(), [inputs[K.POS], *model.parameters()],
                                    allow_unused=True)
        return out, grads

    plain, plain_grads = run()
    monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: 7)
    chunked, chunked_grads = run()
    torch.testing.assert_close(chunked, plain, rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked_grads, plain_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.isfinite(got).all()
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float32_far_from_origin_is_translation_equivariant_to_rounding(name):
    """Shifting a float32 batch by 1e4 Å changes the outputs by no more than a few units in the
    last place of 1e4 (the rounding of the shifted coordinates themselves)."""
    model = _model(name, dtype=torch.float32)
    batch = _radius_graph(_batch(model, n_atoms=(5, 7), dtype=torch.float32, seed=8), 3.0)
    shift = torch.tensor([1e4, -1e4, 5e3])
    ulp = float(np.spacing(np.float32(1e4)))
    with torch.no_grad():
        ref = model(batch)
        moved = model(H.translate_batch(batch, shift)) - shift
    assert float((moved - ref).abs().max()) < 8 * ulp


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deterministic_and_state_dict_round_trip(name):
    model = _model(name, n_channels=4, dtype=torch.float32)
    batch = _batch(model, n_atoms=(2, 9), dtype=torch.float32, seed=9)
    with torch.no_grad():
        first = model(batch)
        assert torch.equal(model(batch), first)
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        buffer.seek(0)
        loaded = build_model(name, model.config).to(torch.float32)
        loaded.load_state_dict(torch.load(buffer))
        assert loaded.normalisation() == model.normalisation()
        assert torch.equal(loaded(batch), first)
