"""Every registered model against the equivariance harness, plus model-specific behaviour."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from surrogate_md import testing as H
from surrogate_md.data import keys as K
from surrogate_md.errors import ConfigError
from surrogate_md.models import MODELS, build_model, compile_model, config_from_dict
from surrogate_md.models.egno import EGNOModel
from surrogate_md.models.estag import ESTAGModel
from surrogate_md.models.layers import TemporalFourierConv, segment_mean, system_centroid
from surrogate_md.models.painet import (
    PAINETModel,
    _dense_attention,
    factorised_attention,
    particle_type_table,
)


def _model(name: str, n_channels: int = 1, dtype=torch.float64, **overrides):
    model = build_model(name, {"n_channels": n_channels, **overrides}).to(dtype)
    model.set_normalisation(velocity_scale=2.0, displacement_scale=0.3, time_scale=0.4)
    return model


def _batch_for(model, **kwargs):
    history = getattr(model.config, "n_history", 3)
    return H.random_batch(n_channels=model.config.n_channels, history=history, **kwargs)


def test_registry_holds_every_model():
    assert set(MODELS) == {"constant", "linear", "egnn", "egno", "estag", "painet"}
    for name, cls in MODELS.items():
        assert cls.name == name
        assert dataclasses.is_dataclass(cls.config_class)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_build_with_defaults_and_frozen_config(name):
    model = build_model(name, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.n_channels = 3
    assert model.has_parameters == any(True for _ in model.parameters())


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="no option 'hiden'"):
        config_from_dict("egno", {"hiden": 3})
    with pytest.raises(ConfigError, match="must be bool"):
        config_from_dict("egno", {"temporal_conv": "yes"})
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("transformer", {})


@pytest.mark.parametrize("n_channels", [1, 4])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_equivariance_and_batch_independence(name, n_channels):
    model = _model(name, n_channels)
    H.perturb_parameters(model, seed=1)
    batch = _batch_for(model, seed=2)
    report = H.check_equivariance(model, batch, seed=3)
    if model.has_parameters:
        assert report.motion > 1e-3, "outputs equal inputs: the equivariance check is vacuous"
    H.check_batch_independence(model, batch)


# parameters that act on an input constant in time, where they cannot act (egno.py's docstring)
CONSTANT_INPUT = {"egno": ("conv_x.0.weight_im",)}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_dtype_and_gradients(name):
    model = _model(name, dtype=torch.float32)
    batch = _batch_for(model, n_atoms=(4, 6, 5), n_times=3, dtype=torch.float32, seed=4)
    out = model(batch)
    assert out.shape == (3, 15, 1, 3) and out.dtype == torch.float32
    if model.has_parameters:
        out.square().mean().backward()
        assert any(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)
        # every parameter reaches the output: a parameter whose gradient is rounding noise
        # (float64) is dead weight, as PAINET's common scale of Phi and Psi was (1e-18 against
        # >= 5e-5). Perturbed first: zero-initialised output layers (ESTAG's) stop gradients
        model = _model(name, dtype=torch.float64)
        H.perturb_parameters(model, scale=0.05, seed=5)
        batch = _batch_for(model, n_atoms=(4, 6, 5), n_times=3, dtype=torch.float64, seed=4)
        model(batch).square().mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
        largest = max(float(g.abs().max()) for g in grads.values())
        dead = [n for n, g in grads.items() if float(g.abs().max()) < 1e-10 * largest
                and n not in CONSTANT_INPUT.get(name, ())]
        assert not dead, f"{name}: parameters with no gradient: {dead}"


def test_segment_count_compiled_equals_eager():
    from surrogate_md.models.layers import segment_count

    index = torch.tensor([0, 3, 3, 1, 3, 0])
    for like in (torch.zeros(1), torch.zeros(1, dtype=torch.long)):
        want = torch.bincount(index, minlength=6).to(like.dtype)
        compiled = torch.compile(lambda i, like=like: segment_count(i, 6, like), backend="eager",
                                 fullgraph=True)
        assert torch.equal(segment_count(index, 6, like), want)
        assert torch.equal(compiled(index), want) and compiled(index).dtype == like.dtype
    torch._dynamo.reset()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiles_as_one_graph_with_eager_values_and_gradients(name):
    """runtime.compile: every model traces as one graph (fullgraph raises on a break), and a batch
    of other sizes reuses it (dynamic shapes), with the eager outputs and gradients. Dynamo's own
    backend keeps this fast; the inductor path runs in bench_training.py --compile."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    fields = {f.name for f in dataclasses.fields(MODELS[name].config_class)}
    small = {k: v for k, v in (("hidden", 16), ("n_layers", 2), ("n_decoder_layers", 2),
                               ("n_history", 3)) if k in fields}
    model = _model(name, dtype=torch.float32, **small)
    compiled = compile_model(model, dynamic=True, fullgraph=True, backend="eager")
    for n_atoms, seed in (((4, 6), 1), ((5, 3, 7), 2)):
        batch = _batch_for(model, n_atoms=n_atoms, dtype=torch.float32, seed=seed)
        want = model(batch)
        grads_want = (torch.autograd.grad(want.square().sum(), list(model.parameters()))
                      if model.has_parameters else [])
        got = compiled(batch)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if model.has_parameters:
            grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
            for g, w in zip(grads, grads_want):
                torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_compiled_inference_takes_the_plain_edge_pass():
    """Compiled inference takes the plain edge pass where eager code runs in chunks (100 fully
    connected nodes, 9900 edges, in 1024-edge chunks at hidden 128 and P = 4): inductor fuses
    the plain pass itself, and the chunk loop broke an AdK-size surrogate's graph into pieces
    whose CPU code generation failed. Training (with gradients) keeps the chunks; the values
    agree with the eager chunked pass."""
    from surrogate_md.models.layers import _edge_chunk_rows

    assert _edge_chunk_rows(9900, 4, 128, torch.device("cpu")) == 1024

    @torch.compile(backend="eager", fullgraph=True)
    def chunked(x):
        return x + (0 if _edge_chunk_rows(9900, 4, 128, x.device) is None else 1)

    torch._dynamo.reset()
    with torch.inference_mode():
        assert float(chunked(torch.zeros(()))) == 0.0
    assert float(chunked(torch.zeros((), requires_grad=True))) == 1.0

    model = EGNOModel(EGNOModel.config_class(hidden=128, n_layers=2)).eval()
    batch = _batch_for(model, n_atoms=100, n_times=4, dtype=torch.float32, seed=3)
    compiled = compile_model(model, fullgraph=True, backend="eager")
    with torch.inference_mode():
        torch.testing.assert_close(compiled(batch), model(batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["egnn", "egno", "estag", "painet"])
def test_autocast_bfloat16_runs(name):
    model = _model(name, dtype=torch.float32)
    batch = _batch_for(model, dtype=torch.float32, seed=5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert out.shape == (4, 12, 1, 3) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["egnn", "egno", "painet"])
def test_wrong_channel_count_is_a_clear_error(name):
    model = _model(name, n_channels=4)
    with pytest.raises(ValueError, match="n_channels=4"):
        model(H.random_batch(n_channels=1))


# --- harness self-tests: each check must be able to fail --------------------------------------

class _Broken(torch.nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def forward(self, batch):
        x, p = batch[K.POS], len(batch[K.TIMES])
        if self.kind == "rotation":  # a fixed direction breaks rotation equivariance
            y = x + torch.tensor([0.3, 0.0, 0.0], dtype=x.dtype)
        elif self.kind == "reflection":  # a cross product is a pseudo-vector: flips under det -1
            y = x + 0.1 * torch.cross(x, batch[K.VEL], dim=-1)
        elif self.kind == "translation":  # velocity scaled by absolute distance from the origin
            y = x + batch[K.VEL] * x.norm(dim=-1, keepdim=True)
        else:  # node index as a feature breaks permutation equivariance
            idx = torch.arange(x.shape[0], dtype=x.dtype).view(-1, 1, 1)
            y = x + 0.01 * idx * batch[K.VEL]
        return y.unsqueeze(0).expand(p, *y.shape)


@pytest.mark.parametrize("kind", ["rotation", "reflection", "translation", "permutation"])
def test_harness_catches_broken_models(kind):
    with pytest.raises(AssertionError, match=kind):
        H.check_equivariance(_Broken(kind), H.random_batch(seed=6))


def test_random_orthogonal_covers_both_determinants():
    for seed in range(5):
        for reflect in (False, True):
            q = H.random_orthogonal(seed, reflect=reflect)
            assert torch.allclose(q @ q.T, torch.eye(3, dtype=q.dtype), atol=1e-12)
            assert np.isclose(float(torch.det(q)), -1.0 if reflect else 1.0)


def test_permute_and_select_keep_masks_and_targets_aligned():
    batch = H.random_batch(n_atoms=(3, 4), seed=7)
    batch[K.TARGET_MASK] = torch.arange(7) % 2 == 0
    batch[K.TARGET] = torch.randn(4, 7, 1, 3, dtype=torch.float64)
    permuted, inverse = H.permute_batch(batch, seed=1)
    assert torch.equal(permuted[K.TARGET_MASK][inverse], batch[K.TARGET_MASK])
    assert torch.equal(permuted[K.TARGET][:, inverse], batch[K.TARGET])
    second = H.select_systems(batch, [1])
    assert second[K.POS].shape == (4, 1, 3) and int(second[K.N_GRAPHS]) == 1
    assert torch.equal(second[K.TARGET_MASK], batch[K.TARGET_MASK][3:])
    assert int(second[K.EDGE_INDEX].max()) == 3 and second[K.EDGE_INDEX].shape[1] == 12


def test_segment_ops_and_centroid():
    x = torch.arange(12, dtype=torch.float64).view(1, 4, 1, 3)
    graph = torch.tensor([1, 0, 1, 0])
    mean = segment_mean(x[0, :, 0], graph, 3)
    assert torch.allclose(mean[0], (x[0, 1, 0] + x[0, 3, 0]) / 2)
    assert torch.equal(mean[2], torch.zeros(3, dtype=torch.float64))  # empty segment
    centre = system_centroid(x, graph, 2)
    assert centre.shape == (1, 4, 1, 3) and torch.allclose(centre[0, 0, 0], mean[1])


# --- EGNO: Fourier convolution on new time grids ------------------------------------------------

def test_fourier_conv_equals_truncated_fft_on_uniform_grid():
    torch.manual_seed(0)
    p, modes, hid = 8, 3, 5
    conv = TemporalFourierConv(hid, modes, vector=False).double()
    f = torch.randn(p, 6, hid, dtype=torch.float64)
    tau = torch.arange(1, p + 1, dtype=torch.float64) / p
    spec = torch.fft.rfft(f, dim=0)[:modes]
    w = torch.complex(conv.weight_re, conv.weight_im).to(torch.complex128)
    mixed = torch.zeros(p // 2 + 1, 6, hid, dtype=torch.complex128)
    mixed[:modes] = torch.einsum("kab,knb->kna", w, spec)
    expected = torch.fft.irfft(mixed, n=p, dim=0)
    assert torch.allclose(conv(f, tau), expected, atol=1e-12)


def test_vector_fourier_conv_is_the_complex_truncated_fft_per_component():
    # the reference mixes the vector channels with complex weights (a filter with a phase: it
    # can shift a signal in time); each x/y/z component sees the same complex mixing
    torch.manual_seed(2)
    p, modes, v = 8, 2, 4
    conv = TemporalFourierConv(v, modes, vector=True).double()
    with torch.no_grad():
        conv.weight.normal_()
        conv.weight_im.normal_()
    f = torch.randn(p, 5, v, 3, dtype=torch.float64)
    tau = torch.arange(1, p + 1, dtype=torch.float64) / p
    spec = torch.fft.rfft(f, dim=0)[:modes]
    w = torch.complex(conv.weight, conv.weight_im).to(torch.complex128)
    mixed = torch.zeros(p // 2 + 1, 5, v, 3, dtype=torch.complex128)
    mixed[:modes] = torch.einsum("kab,knbx->knax", w, spec)
    assert torch.allclose(conv(f, tau), torch.fft.irfft(mixed, n=p, dim=0), atol=1e-12)
    # a pure imaginary weight on mode 1 turns cos(2 pi tau) into a sine: a quarter-period shift
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight_im.zero_()
        conv.weight_im[1] = torch.eye(v)
    cos = torch.cos(2 * torch.pi * tau).view(-1, 1, 1, 1).expand(p, 1, v, 3)
    expected = -torch.sin(2 * torch.pi * tau).view(-1, 1, 1, 1).expand(p, 1, v, 3)
    assert torch.allclose(conv(cos, tau), expected, atol=1e-12)


def test_fourier_conv_zero_shot_resolution_is_exact_for_band_limited_signals():
    torch.manual_seed(1)
    modes = 2
    conv = TemporalFourierConv(3, modes, vector=True).double()
    coef = torch.randn(3, 7, 3, 3, dtype=torch.float64)

    def signal(tau):
        t = tau.view(-1, 1, 1, 1)
        two_pi = 2 * torch.pi
        return coef[0] + coef[1] * torch.cos(two_pi * t) + coef[2] * torch.sin(two_pi * t)

    coarse = torch.arange(1, 5, dtype=torch.float64) / 4
    fine = torch.arange(1, 9, dtype=torch.float64) / 8
    out_coarse, out_fine = conv(signal(coarse), coarse), conv(signal(fine), fine)
    assert torch.allclose(out_fine[1::2], out_coarse, atol=1e-12)


def test_egno_new_time_grids():
    model = _model("egno")
    H.perturb_parameters(model, seed=2)
    batch = H.random_batch(n_times=4, seed=8)
    for times in (torch.arange(1, 9, dtype=torch.float64) * 0.05,  # 2P points
                  torch.tensor([0.013, 0.1, 0.37], dtype=torch.float64)):  # arbitrary offsets
        new = dict(batch, **{K.TIMES: times})
        out = model(new)
        assert out.shape == (len(times), 12, 1, 3) and torch.isfinite(out).all()
        H.check_equivariance(model, new, seed=9)


def test_egno_temporal_conv_switch():
    with_conv, without = _model("egno"), _model("egno", temporal_conv=False)
    assert isinstance(with_conv, EGNOModel)
    names = {n for n, _ in without.named_parameters()}
    assert not any(n.startswith("conv_") for n in names)
    assert sum(p.numel() for p in with_conv.parameters()) > sum(p.numel() for p in
                                                                without.parameters())


# --- ESTAG ---------------------------------------------------------------------------------

def test_estag_untrained_copies_last_frame_and_needs_history():
    model = _model("estag", n_history=5)
    assert isinstance(model, ESTAGModel) and model.needs_history
    batch = H.random_batch(history=5, n_times=2, seed=10)
    out = model(batch)
    assert torch.equal(out, batch[K.HIST][-1].expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match="needs batch\\['hist'\\]"):
        model({k: v for k, v in batch.items() if k != K.HIST})
    with pytest.raises(ValueError, match="n_history=5"):
        model(H.random_batch(history=3))


def test_estag_uses_the_history():
    model = _model("estag", n_history=5)
    H.perturb_parameters(model, seed=3)
    batch = H.random_batch(history=5, seed=11)
    changed = dict(batch, **{K.HIST: batch[K.HIST].clone()})
    changed[K.HIST][0] += 0.5
    assert not torch.allclose(model(batch), model(changed))


# --- PAINET ----------------------------------------------------------------------------------

def _qkv(n, heads=2, d=3, f=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    q = norm(torch.randn(n, heads, d, generator=gen, dtype=torch.float64), dim=-1)
    k = norm(torch.randn(n, heads, d, generator=gen, dtype=torch.float64), dim=-1)
    v = torch.randn(n, heads, f, generator=gen, dtype=torch.float64)
    return q, k, v


def test_painet_factorised_attention_equals_dense():
    q, k, v = _qkv(11)
    gen = torch.Generator().manual_seed(1)
    ptype = torch.randint(0, 3, (11,), generator=gen)
    phi = 0.5 + torch.rand(3, 3, generator=gen, dtype=torch.float64)
    psi = phi * torch.rand(3, 3, generator=gen, dtype=torch.float64)
    # two systems of 5 and 6 nodes, interleaved in the flat node list
    graph = torch.tensor([0, 1, 0, 1, 1, 0, 1, 0, 1, 0, 1])
    fact = factorised_attention(q, k, v, ptype, phi, psi, graph, 2)
    for b in range(2):
        sel = graph == b
        dense = _dense_attention(q[sel], k[sel], v[sel], ptype[sel], phi, psi)
        assert torch.allclose(fact[sel], dense, atol=1e-12)


def test_painet_pair_weights_and_types():
    model = _model("painet")
    assert isinstance(model, PAINETModel)
    H.perturb_parameters(model, scale=2.0, seed=4)
    phi, psi = model.pair_weights()
    assert (phi > psi).all() and (psi > 0).all()
    table = particle_type_table(128, 6)
    assert table[1] == 0 and table[6] == 1 and table[8] == 3 and table[26] == 5
    assert int(table.max()) == 5 and int(table.min()) == 0


def test_painet_attention_is_all_pair_beyond_the_graph():
    """Nodes with no edges between them still influence each other (within a system only)."""
    model = _model("painet")
    H.perturb_parameters(model, seed=5)
    batch = H.random_batch(n_atoms=(6, 5), seed=12)
    src, dst = batch[K.EDGE_INDEX]
    keep = ~((src == 0) | (dst == 0))  # isolate node 0 from the graph
    batch[K.EDGE_INDEX] = batch[K.EDGE_INDEX][:, keep]
    batch[K.EDGE_TYPE] = batch[K.EDGE_TYPE][keep]
    changed = dict(batch, **{K.VEL: batch[K.VEL].clone()})
    changed[K.VEL][0] *= 3.0
    before, after = model(batch), model(changed)
    assert not torch.allclose(before[:, 1:6], after[:, 1:6])  # same system: all-pair effect
    assert torch.allclose(before[:, 6:], after[:, 6:], atol=1e-12)  # other system untouched


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_autocast_float16(name):
    model = _model(name, dtype=torch.float32).cuda()
    batch = {k: v.cuda() for k, v in _batch_for(model, dtype=torch.float32, seed=13).items()}
    with torch.autocast(device_type="cuda", dtype=torch.float16):
        out = model(batch)
    assert out.shape == (4, 12, 1, 3) and torch.isfinite(out).all()
    if model.has_parameters:
        out.float().square().mean().backward()


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(MODELS))
def test_cuda_equivariance_float64(name):
    """The harness on CUDA tensors: rotations, reflections, translations and permutations move
    to the batch's device (each model on the GPU as on the CPU)."""
    model = _model(name, 4).cuda()
    H.perturb_parameters(model, seed=1)
    batch = {k: v.cuda() for k, v in _batch_for(model, seed=2).items()}
    report = H.check_equivariance(model, batch, seed=3)
    if model.has_parameters:
        assert report.motion > 1e-3
    H.check_batch_independence(model, batch)
