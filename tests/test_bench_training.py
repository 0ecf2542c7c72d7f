"""The training benchmark runs at tiny sizes, and the chunked edge pass it measures is exact.

The chunked, recomputed edge pass of :class:`~surrogate_md.models.layers.EGNNLayer` (the change
that makes training lean) must give the same outputs and gradients as ordinary autograd through
every edge tensor, and must keep far fewer bytes for backward.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from surrogate_md import testing as H
from surrogate_md.data import keys as K
from surrogate_md.models import build_model, compile_model
from surrogate_md.models import layers as L

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmarks" / "bench_training.py"


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every small matmul of a
    2-thread pool waits for a core (measured: 16 ms instead of 8 us per call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _load():
    spec = importlib.util.spec_from_file_location("bench_training", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's annotations there
    spec.loader.exec_module(module)
    return module


def _table(text: str) -> list[list[str]]:
    """The last Markdown table of the output (the machine table comes first)."""
    blocks = [b for b in text.split("\n\n") if b.strip().startswith("|")]
    assert blocks, text
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in blocks[-1].splitlines() if line.startswith("|")]
    header, sep = rows[0], rows[1]
    assert all(set(cell) <= set("-:") and cell for cell in sep)
    assert len(sep) == len(header)
    assert all(len(row) == len(header) for row in rows[2:])
    return rows


def test_quick_training_benchmark_table_and_json(tmp_path, capsys):
    bench = _load()
    out = tmp_path / "train.json"
    assert bench.main(["--quick", "--in-process", "--threads", "1", "--json", str(out)]) == 0
    rows = _table(capsys.readouterr().out)
    header, body = rows[0], rows[2:]
    expected = [c.name for c in bench.reference_configs(quick=True, adk_batches=[1, 2])]
    assert [row[0] for row in body] == expected
    for name in ("samples/s", "ref samples/s", "speed vs ref", "ref GB"):
        assert name in header
    speed = header.index("samples/s")
    assert all(float(row[speed]) > 0 for row in body)
    # tiny models: the reference figures are shown, but no ratio against them
    ratio, ref = header.index("speed vs ref"), header.index("ref samples/s")
    by_name = {row[0]: row for row in body}
    assert by_name["egno aspirin"][ref] == "100.0" and by_name["egno aspirin"][ratio] == "-"
    assert all(row[ratio] == "-" and row[header.index("memory vs ref")] == "-" for row in body)
    data = json.loads(out.read_text())
    # at full size the EGNO/ESTAG rows carry their ratio, the others a dash
    full = bench._table(data["configs"], "RSS", False, "samples_per_s", quick=False)
    full_rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
                 for line in full.splitlines()[2:]}
    assert full_rows["egno aspirin"][ratio].endswith("x")
    assert full_rows["estag aspirin history"][ratio].endswith("x")
    assert full_rows["egnn aspirin"][ratio] == "-"
    assert [c["config"]["name"] for c in data["configs"]] == expected
    for entry in data["configs"]:
        result = entry["result"]
        assert result["seconds_per_step"] > 0 and result["peak_bytes"] >= 0
        assert result["samples_per_s"] == pytest.approx(entry["config"]["batch"]
                                                        / result["seconds_per_step"])
    assert not list(tmp_path.glob("*.tmp*"))


def test_fresh_process_and_comparison_columns(tmp_path, capsys):
    """Each configuration runs in its own child; ``--compare-src`` adds before/after columns."""
    bench = _load()
    out = tmp_path / "cmp.json"
    assert bench.main(["--quick", "--device", "cpu", "--only", "egno aspirin", "--compare-src",
                       str(ROOT), "--json", str(out)]) == 0  # RSS columns: on a GPU node too
    rows = _table(capsys.readouterr().out)
    header, body = rows[0], rows[2:]
    assert len(body) == 1 and "speed-up" in header and "peak RSS (GiB)" in header
    data = json.loads(out.read_text())
    entry = data["configs"][0]
    assert entry["before"]["n_edges"] == entry["result"]["n_edges"] > 0
    # a fresh process sees its high-water mark grow by the step's allocations
    assert entry["result"]["peak_bytes"] > 0


def test_compiled_rows_beside_eager_ones(tmp_path, capsys):
    """``--compile`` adds an inductor-compiled run of each configuration, and the machine table
    says whether the CPU has native bf16."""
    bench = _load()
    out = tmp_path / "compiled.json"
    assert bench.main(["--quick", "--in-process", "--only", "egno aspirin", "--compile",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "native bf16" in text.split("\n\n")[0]
    rows = _table(text)
    header, body = rows[0], rows[2:]
    assert [row[0] for row in body] == ["egno aspirin", "egno aspirin compiled"]
    speed = header.index("samples/s")
    assert all(float(row[speed]) > 0 for row in body)
    data = json.loads(out.read_text())
    assert [c["config"]["compiled"] for c in data["configs"]] == [False, True]
    assert isinstance(data["machine"]["native_bf16"], bool)
    # compilation happens in the untimed first step
    first = [c["result"]["first_step_seconds"] for c in data["configs"]]
    assert first[1] > first[0]


def test_bad_batch_sizes_are_rejected():
    bench = _load()
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--in-process", "--batch-sizes", "0"])


def test_only_matching_nothing_is_an_error(tmp_path, capsys):
    """A misspelt --only (names are case-sensitive) printed an empty table and wrote a JSON with
    no configuration."""
    bench = _load()
    out = tmp_path / "none.json"
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--in-process", "--only", "adk", "--json", str(out)])
    err = capsys.readouterr().err
    assert "--only adk matches no configuration" in err and "egno AdK x1" in err
    assert not out.exists()


def test_repeats_sets_the_timed_steps_of_every_configuration(tmp_path, capsys):
    """``--repeats N``: N timed steps in each configuration (a GPU step takes milliseconds, so the
    default 3 at AdK size leaves its median to chance); less than 1 is refused."""
    bench = _load()
    out = tmp_path / "r.json"
    assert bench.main(["--quick", "--in-process", "--device", "cpu", "--only", "egno aspirin",
                       "estag", "--repeats", "4", "--json", str(out)]) == 0
    configs = json.loads(out.read_text())["configs"]
    assert len(configs) == 2 and all(c["config"]["repeats"] == 4 for c in configs)
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--in-process", "--repeats", "0"])
    assert "--repeats must be at least 1" in capsys.readouterr().err


def _model_and_batch(name: str, n_channels: int, dtype):
    """A small perturbed model and a batch of two systems (9 and 11 atoms, fully connected)."""
    options = {"n_channels": n_channels, "hidden": 16}
    if name == "estag":
        options["n_history"] = 3
    torch.manual_seed(0)
    model = build_model(name, options).to(dtype)
    model.set_normalisation(velocity_scale=2.0, displacement_scale=0.3, time_scale=0.4)
    H.perturb_parameters(model, seed=1)
    batch = H.random_batch(n_atoms=(9, 11), n_channels=n_channels, history=3, seed=2,
                           dtype=dtype)
    return model, batch


def _run(name: str, n_channels: int, rows: int | None, monkeypatch, dtype=torch.float64):
    model, batch = _model_and_batch(name, n_channels, dtype)
    # rows: force chunks of a few edges (several per system); None: plain autograd through
    # every edge tensor
    monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
    out = model(batch)
    (out.square().sum() + out.sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("n_channels", [1, 4])
@pytest.mark.parametrize("name", ["egnn", "egno", "estag", "painet"])
def test_chunked_edge_pass_matches_plain_autograd(name, n_channels, monkeypatch):
    plain_out, plain_grads = _run(name, n_channels, None, monkeypatch)
    chunk_out, chunk_grads = _run(name, n_channels, 7, monkeypatch)
    assert torch.allclose(chunk_out, plain_out, rtol=0, atol=1e-12)
    assert set(chunk_grads) == set(plain_grads)
    moved = 0
    for key, ref in plain_grads.items():
        assert torch.allclose(chunk_grads[key], ref, rtol=1e-9, atol=1e-11), key
        moved += int(ref.abs().max() > 0)
    assert moved > len(plain_grads) // 2  # the comparison is not between zero gradients


def _compiled_run(name: str, n_channels: int, rows: int, monkeypatch, backend: str,
                  dtype=torch.float64, low: bool = False):
    """Outputs and gradients with every EGNN layer's chunks through ``compile_model``'s compiled
    chunk (the model itself eager, so only the edge pass differs from :func:`_run`)."""
    model, batch = _model_and_batch(name, n_channels, dtype)
    compile_model(model, backend=backend)  # switches the layers to compiled chunks
    layers = [m for m in model.modules() if isinstance(m, L.EGNNLayer)]
    assert layers and all(m.compiled_chunk is not None for m in layers)
    monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
    from torch._dynamo.utils import counters

    calls = []
    for layer in layers:
        def counted(*args, _compiled=layer.compiled_chunk):
            calls.append((args[5].shape[0], args[1].shape[1]))  # edges, nodes of this chunk
            return _compiled(*args)
        layer.compiled_chunk = counted
    torch._dynamo.reset()
    counters.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
        out = model(batch).to(dtype)
    (out.square().sum() + out.sum()).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    # one graph per kind of call (no grad / grad, messages wanted or not), never one per chunk
    graphs = counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    return out.detach(), grads, calls, graphs


@pytest.mark.parametrize("n_channels", [1, 4])
@pytest.mark.parametrize("name", ["egno", "estag"])
def test_compiled_chunks_match_plain_autograd(name, n_channels, monkeypatch):
    """compile_model's per-chunk compilation (dynamo tracing, eager kernels: fast) gives the plain
    pass's outputs and gradients, forward and recomputed backward, chunks of uneven size."""
    plain_out, plain_grads = _run(name, n_channels, None, monkeypatch)
    out, grads, calls, graphs = _compiled_run(name, n_channels, 5, monkeypatch, "eager")
    edges, nodes = zip(*calls)
    assert len(calls) > 20 and max(edges) == 5 and min(edges) < 5  # the last chunk is shorter
    # each chunk sees its own nodes only (at most 2 per edge), never the batch's 20
    assert max(nodes) <= 10 and all(u <= 2 * e for e, u in calls)
    assert 1 <= graphs <= 4
    assert torch.allclose(out, plain_out, rtol=0, atol=1e-12)
    assert set(grads) == set(plain_grads)
    for key, ref in plain_grads.items():
        assert torch.allclose(grads[key], ref, rtol=1e-9, atol=1e-11), key


def test_inductor_compiled_chunks_under_bf16_autocast(monkeypatch):
    """The configuration it is for (inductor kernels, bf16 autocast): outputs and gradients as
    close to float32 as the eager chunked pass under the same autocast (inductor rounds at other
    points, so the two bf16 results differ from each other by bf16 rounding)."""
    def eager(rows, low):
        model, batch = _model_and_batch("egno", 1, torch.float32)
        monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            out = model(batch).float()
        (out.square().sum() + out.sum()).backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                              if p.grad is not None}

    def flat(grads):
        return torch.cat([grads[k].flatten() for k in sorted(grads)])

    ref_out, ref_grads = eager(12, False)
    low_out, low_grads = eager(12, True)
    out, grads, calls, graphs = _compiled_run("egno", 1, 12, monkeypatch, "inductor",
                                              dtype=torch.float32, low=True)
    # inductor may add one size guard per kind of call (here the 2-edge last chunk): still a
    # handful of graphs for 128 chunk calls (16 chunks, 4 layers, forward and backward), far
    # below dynamo's recompile limit of 8
    assert len(calls) == 128 and 1 <= graphs <= 6
    low_error = float((low_out - ref_out).abs().max())
    assert 0 < low_error < 0.05
    assert float((out - ref_out).abs().max()) <= 2 * low_error
    assert set(grads) == set(ref_grads)
    ref, low_error = flat(ref_grads), float((flat(low_grads) - flat(ref_grads)).norm())
    assert 0 < low_error < 0.05 * float(ref.norm())
    assert float((flat(grads) - ref).norm()) <= 2 * low_error


def test_chunked_edge_pass_in_inference(monkeypatch):
    model = build_model("egno", {"hidden": 16, "n_channels": 4}).double()
    H.perturb_parameters(model, seed=6)
    batch = H.random_batch(n_channels=4, seed=7)
    with torch.no_grad():
        monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: None)
        plain = model(batch)
        monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: 5)
        chunked = model(batch)
    assert torch.allclose(chunked, plain, rtol=0, atol=1e-12)
    assert float((plain - batch[K.POS]).abs().max()) > 1e-3


def test_chunked_edge_pass_keeps_few_bytes_for_backward(monkeypatch):
    """The recomputed pass saves node tensors only; plain autograd saves (T, E, H) blocks."""
    model = build_model("egno", {"hidden": 32, "n_layers": 2})
    batch = H.random_batch(n_atoms=(30, 30), n_times=4, dtype=torch.float32, seed=3)

    def saved_bytes(rows: int | None) -> int:
        monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(batch)
        return sum(seen.values())

    plain, chunked = saved_bytes(None), saved_bytes(256)
    edge_block = 4 * 2 * 30 * 29 * 32 * 4  # one (T, E, H) float32 tensor
    assert plain > 4 * edge_block
    assert chunked < plain / 4


def test_chunked_edge_pass_under_cpu_autocast(monkeypatch):
    monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: 16)
    model = build_model("egno", {"hidden": 16, "n_layers": 2})
    H.perturb_parameters(model, seed=4)
    batch = H.random_batch(dtype=torch.float32, seed=5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = model(batch)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)


@pytest.mark.parametrize("name", ["egnn", "egno", "estag", "painet"])
def test_bf16_autocast_error_does_not_grow_away_from_the_origin(name, monkeypatch):
    """Under bf16 autocast (training on CPU/GPU) the models must not round absolute coordinates:
    a protein sits tens of Å from the origin, where bf16 resolves only ~0.1-0.2 Å. Chunked and
    plain edge passes agree under autocast too: exactly where both sum messages in float32
    (dense graphs), to bf16 rounding where the plain pass sums a sparse graph's messages in bf16."""
    options = {"hidden": 16}
    if name == "estag":
        options["n_history"] = 3
    torch.manual_seed(0)
    model = build_model(name, options)
    model.set_normalisation(velocity_scale=2.0, displacement_scale=0.3, time_scale=0.4)
    H.perturb_parameters(model, seed=1)
    batch = H.random_batch(n_atoms=(9, 11), history=3, seed=2, dtype=torch.float32)

    def run(shift: float, rows: int | None, low: bool) -> torch.Tensor:
        monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
        moved = dict(batch)
        moved[K.POS] = batch[K.POS] + shift
        if K.HIST in batch:
            moved[K.HIST] = batch[K.HIST] + shift
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            return model(moved).float() - shift

    errors = {}
    for shift in (0.0, 40.0):
        exact = run(shift, None, False)
        low = run(shift, None, True)
        chunked = run(shift, 5, True)
        # bf16 sums in another order: up to 1.3e-3 Å on outputs of ~4 Å on a CPU with native
        # bf16 (oneDNN's kernels differ between CPUs), a third of one bf16 step at 1 Å
        assert torch.allclose(chunked, low, rtol=0, atol=3e-3)
        with monkeypatch.context() as dense:  # float32 message sums in the plain pass too
            dense.setattr(L, "_LOW_PRECISION_SUM_MAX_DEGREE", 0)
            assert torch.allclose(chunked, run(shift, None, True), rtol=0, atol=1e-5)
        errors[shift] = float((low - exact).abs().max())
    displacement = float((run(0.0, None, False) - batch[K.POS]).abs().max())
    assert displacement > 1e-2  # the models move the atoms: the comparison is not trivial
    assert errors[0.0] < 0.05
    assert errors[40.0] < 2 * errors[0.0] + 2e-3, errors


def test_chunk_policy_follows_graph_size():
    cpu = torch.device("cpu")
    # AdK backbone (855 atoms, 8 Å graph, P = 4, hidden 128): chunked, in cache-sized blocks
    rows = L._edge_chunk_rows(31_721, 4, 128, cpu)
    assert rows is not None and 4 * rows * 128 <= 2**20
    # aspirin x100 (P = 8, hidden 64): small enough to keep its edge tensors
    assert L._edge_chunk_rows(4_600, 8, 64, cpu) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16: fewer, larger chunks
        bf16_rows = L._edge_chunk_rows(31_721, 4, 128, cpu)
        assert bf16_rows is not None and rows < bf16_rows and 4 * bf16_rows * 128 <= 2**21
        assert L._edge_chunk_rows(4_600, 8, 64, cpu) is None
    # CUDA: 32 M-value blocks, and a graph of more than one block is chunked (the device is
    # only named here, never used)
    cuda = torch.device("cuda")
    assert L._edge_chunk_rows(31_721, 4, 128, cuda) is None  # 16 M values: one block
    rows = L._edge_chunk_rows(8 * 31_721, 4, 128, cuda)  # batch 8: 130 M values
    assert rows is not None and 4 * rows * 128 <= 2**25


def test_quick_training_benchmark_bf16_rows(capsys):
    bench = _load()
    assert bench.main(["--quick", "--in-process", "--only", "egno aspirin", "--precision", "fp32",
                       "bf16"]) == 0
    body = _table(capsys.readouterr().out)[2:]
    assert [row[0] for row in body] == ["egno aspirin", "egno aspirin bf16"]


def test_bucket_rows_is_a_bounded_set_of_sizes():
    sizes = [L.bucket_rows(n) for n in range(1, 5000)]
    assert all(n <= b <= n + max(n // 16, 1) for n, b in zip(range(1, 5000), sizes))
    assert L.bucket_rows(4096) == 4096 and L.bucket_rows(4097) == 4352
    assert len({b for b in sizes if 1024 <= b < 2048}) == 16  # 16 sizes per octave


def test_edge_blocks_are_padded_only_under_cpu_low_precision_autocast():
    cpu = torch.device("cpu")
    assert not L._pads_edge_rows(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert L._pads_edge_rows(cpu)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert not L._pads_edge_rows(cpu)


_EDGE_MESSAGES = L.EGNNLayer._edge_messages


def _low_precision_run(name: str, rows: int | None, monkeypatch, pad: bool | None = None,
                       compiled: bool = False):
    """Outputs, gradients and the edge-block sizes the products saw, under CPU bf16 autocast
    (``pad``: force padding on or off; None: the library's own choice)."""
    model, batch = _model_and_batch(name, 1, torch.float32)
    if compiled:
        compile_model(model, backend="eager")
    monkeypatch.setattr(L, "_edge_chunk_rows", lambda *args: rows)
    if pad is not None:
        monkeypatch.setattr(L, "_pads_edge_rows", lambda device: pad)
    blocks = []

    def recorded(self, a_i, *args):
        blocks.append(a_i.shape[1])
        return _EDGE_MESSAGES(self, a_i, *args)
    monkeypatch.setattr(L.EGNNLayer, "_edge_messages", recorded)
    torch._dynamo.reset()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch).float()
    (out.square().sum() + out.sum()).backward()
    torch._dynamo.reset()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, blocks


@pytest.mark.parametrize("rows, compiled", [(None, False), (40, False), (40, True)],
                         ids=["plain", "chunked", "compiled chunks"])
def test_padded_edge_blocks_give_the_unpadded_results(rows, compiled, monkeypatch):
    """Under CPU bf16 autocast the edge blocks are padded to a bounded set of sizes (the plain
    pass's 182 edges to 184, the chunked pass's last 22 of 182 to 25 = 5 x 40 / 8) so oneDNN
    sees few shapes; the padded edges change no output and no gradient."""
    out, grads, blocks = _low_precision_run("egno", rows, monkeypatch, compiled=compiled)
    ref_out, ref_grads, ref_blocks = _low_precision_run("egno", rows, monkeypatch, pad=False,
                                                        compiled=compiled)
    assert set(ref_blocks) == ({182} if rows is None else {40, 22})
    assert set(blocks) == ({184} if rows is None else {40, 25})
    assert torch.allclose(out, ref_out, rtol=0, atol=1e-6)
    assert set(grads) == set(ref_grads)
    for key, ref in ref_grads.items():
        assert torch.allclose(grads[key], ref, rtol=1e-3, atol=1e-6), key
