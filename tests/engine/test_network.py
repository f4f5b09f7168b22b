from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.decoder.recurrence import BOUND_SAFETY
from edge_agent.engine.kaldi_nnet import parse_nnet
from edge_agent.engine.network import NumpyNetwork
from tests.conftest import require_module
from tests.engine.nnet_files import Layer, binary_nnet, random_fsmn_network, reference_forward


def run_chunked(network, features: np.ndarray, sizes: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    state = network.new_state()
    out, offset, i = [], 0, 0
    while offset < features.shape[0]:
        size = sizes[i % len(sizes)]
        out.append(network.forward(state, features[offset : offset + size]))
        offset += size
        i += 1
    out.append(network.forward(state, features[:0], final=True))
    return np.concatenate(out)


def small_network():  # type: ignore[no-untyped-def]
    layers = random_fsmn_network(seed=7)
    return layers, NumpyNetwork(parse_nnet(binary_nnet(layers), "small.net"))


def test_numpy_network_matches_the_documented_maths() -> None:
    layers, network = small_network()
    features = np.random.default_rng(0).normal(size=(23, 6)).astype(np.float32)
    got = network.forward(network.new_state(), features, final=True)
    np.testing.assert_allclose(got, reference_forward(layers, features), atol=1e-5)


@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 5], [100]])
def test_chunked_equals_whole_on_a_small_network(sizes: list[int]) -> None:
    layers, network = small_network()
    features = np.random.default_rng(1).normal(size=(31, 6)).astype(np.float32)
    expected = reference_forward(layers, features)
    np.testing.assert_allclose(run_chunked(network, features, sizes), expected, atol=1e-5)


@pytest.mark.parametrize("room", [None, 2])
def test_short_chunks_of_every_size_equal_whole(room: int | None, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A live stream's short chunks go through the stream's scratch rows, an odd number of
    frames multiplied with one row more: rows handed back stay as they were after later chunks.
    With little room in the FSMN stores, chunks that do not fit take the long chunks' path."""
    from edge_agent.engine import network as network_module

    if room is not None:
        monkeypatch.setattr(network_module._FsmnBuffer, "_ROOM", room)
    layers, network = small_network()
    features = np.random.default_rng(6).normal(size=(120, 6)).astype(np.float32)
    expected = reference_forward(layers, features)
    np.testing.assert_allclose(
        run_chunked(network, features, [1, 2, 3, 4, 5, 6, 7, 8, 9, 0]), expected, atol=1e-5
    )


def test_rows_handed_back_stay_while_other_streams_run() -> None:
    """Short chunks of every stream a thread feeds share scratch rows: what ``hidden`` hands
    back is the caller's (the small network's body ends with an FSMN layer, whose rows would
    otherwise be scratch)."""
    _, network = small_network()
    rng = np.random.default_rng(9)
    features = [rng.normal(size=(40, 6)).astype(np.float32) for _ in range(3)]
    states = [network.new_state() for _ in features]
    kept: list[list[np.ndarray]] = [[] for _ in features]
    for offset in range(0, 40, 4):
        for stream, state in enumerate(states):
            kept[stream].append(network.hidden(state, features[stream][offset : offset + 4]))
    for stream, state in enumerate(states):
        kept[stream].append(network.hidden(state, features[stream][:0], final=True))
        whole = network.hidden(network.new_state(), features[stream], final=True)
        np.testing.assert_allclose(np.concatenate(kept[stream]), whole, atol=1e-5)


def test_streams_fed_on_several_threads_at_once_get_their_own_rows() -> None:
    """Each thread computes short chunks in scratch rows of its own: streams fed on several
    threads at the same time give the rows each gives alone."""
    import threading

    _, network = small_network()
    rng = np.random.default_rng(10)
    features = [rng.normal(size=(600, 6)).astype(np.float32) for _ in range(4)]
    expected = [network.hidden(network.new_state(), f, final=True) for f in features]
    got: list[np.ndarray | None] = [None] * len(features)
    start = threading.Barrier(len(features))

    def feed(stream: int) -> None:
        state = network.new_state()
        start.wait()
        rows = [network.hidden(state, features[stream][o : o + 3]) for o in range(0, 600, 3)]
        got[stream] = np.concatenate([*rows, network.hidden(state, features[stream][:0], final=True)])

    threads = [threading.Thread(target=feed, args=(stream,)) for stream in range(len(features))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_allclose(have, want, atol=1e-5)  # type: ignore[arg-type]


def test_outputs_wait_for_lookahead_then_flush() -> None:
    _, network = small_network()
    state = network.new_state()
    assert network.lookahead_frames == 3  # 2 + 1
    first = network.forward(state, np.zeros((3, 6), np.float32))
    assert first.shape[0] == 0  # every frame still waits for its future
    rest = network.forward(state, np.zeros((0, 6), np.float32), final=True)
    assert rest.shape[0] == 3


def test_columns_select_normalised_posteriors() -> None:
    _, network = small_network()
    features = np.random.default_rng(2).normal(size=(9, 6)).astype(np.float32)
    full = network.forward(network.new_state(), features, final=True)
    some = network.forward(network.new_state(), features, final=True, columns=np.array([0, 2]))
    np.testing.assert_allclose(some, full[:, [0, 2]], atol=1e-6)
    np.testing.assert_allclose(full.sum(axis=1), 1.0, atol=1e-5)


def test_finished_state_cannot_be_reused() -> None:
    _, network = small_network()
    state = network.new_state()
    network.forward(state, np.zeros((4, 6), np.float32), final=True)
    with pytest.raises(RuntimeError, match=r"finished"):
        network.forward(state, np.zeros((1, 6), np.float32))


def test_wrong_feature_width_is_refused() -> None:
    _, network = small_network()
    with pytest.raises(ValueError, match=r"\(n, 6\)"):
        network.forward(network.new_state(), np.zeros((4, 5), np.float32))


def real_features(numpy_model, example_wav) -> np.ndarray:  # type: ignore[no-untyped-def]
    from edge_agent.audio.wav import read_wav, to_mono_16k
    from edge_agent.engine.features import FeatureStream

    samples = to_mono_16k(read_wav(example_wav))
    stream = FeatureStream(numpy_model.cmvn)
    return np.concatenate([stream.accept(samples), stream.finish()])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_real_network_chunked_equals_whole(backend, numpy_model, torch_model, example_wav) -> None:  # type: ignore[no-untyped-def]
    model = numpy_model if backend == "numpy" else torch_model
    features = real_features(numpy_model, example_wav)
    whole = model.network.forward(model.network.new_state(), features, final=True)
    for sizes in ([1], [3], [7, 2, 33]):
        np.testing.assert_allclose(run_chunked(model.network, features, sizes), whole, atol=1e-4)


def test_numpy_and_torch_backends_agree(numpy_model, torch_model, example_wav) -> None:  # type: ignore[no-untyped-def]
    features = real_features(numpy_model, example_wav)
    ours = numpy_model.network.forward(numpy_model.network.new_state(), features, final=True)
    theirs = torch_model.network.forward(torch_model.network.new_state(), features, final=True)
    assert ours.shape == theirs.shape == (features.shape[0], 2599)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_torch_backend_matches_documented_maths_on_small_network() -> None:
    # The module imports torch lazily, so importing it proves nothing: torch itself is required.
    require_module("torch")
    torch_network = pytest.importorskip("edge_agent.engine.torch_network")
    layers = random_fsmn_network(seed=9)
    network = torch_network.TorchNetwork(parse_nnet(binary_nnet(layers), "small.net"))
    features = np.random.default_rng(3).normal(size=(17, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run_chunked(network, features, [2, 5]), reference_forward(layers, features), atol=1e-5
    )


def test_output_layer_bounds_are_upper_bounds_and_posteriors_exact() -> None:
    layers, network = small_network()
    hidden = np.random.default_rng(4).normal(size=(600, 3)).astype(np.float32) * 3  # 3 blocks
    full = reference_forward(layers[-2:], hidden)  # the output layer's documented maths
    columns = np.array([0, 2])
    np.testing.assert_allclose(network.output.posteriors(hidden), full, atol=1e-6)
    np.testing.assert_allclose(network.output.posteriors(hidden, columns), full[:, columns], atol=1e-6)
    bounds = network.output.bounds(hidden, columns)
    assert (bounds >= full[:, columns] - 1e-7).all()
    np.testing.assert_allclose(bounds.sum(axis=1), 1.0, atol=1e-6)  # a softmax over the subset


def test_bounds_of_a_few_rows_and_of_many_agree_and_stay_upper_bounds() -> None:
    """A few rows' bounds come from differences of logits, many rows' from a softmax of the
    logits: the same values within float32 rounding, and still upper bounds when logits lie
    hundreds apart (the differences are capped, which can only raise a bound)."""
    layers, network = small_network()
    rng = np.random.default_rng(8)
    hidden = (rng.normal(size=(600, 3)) * np.repeat([3.0, 300.0], 300)[:, None]).astype(np.float32)
    exact = reference_forward(layers[-2:], hidden)
    for columns in (np.array([0, 2]), np.array([1]), np.array([3, 0, 1])):
        many = network.output.bounds(hidden, columns)
        few = np.concatenate([network.output.bounds(hidden[i : i + 3], columns) for i in range(0, 600, 3)])
        # Upper bounds but for float32 rounding, which the decoder allows for (BOUND_SAFETY).
        assert np.isfinite(few).all() and (few >= exact[:, columns] * BOUND_SAFETY - 1e-7).all()
        np.testing.assert_allclose(few, many, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sizes", [[], [5], [0, 5], [3, 0, 4], [100, 200, 300, 1], [256, 256], [255, 2, 600]])
def test_posteriors_of_parts_equal_those_of_their_concatenation(sizes: list[int], numpy_model) -> None:  # type: ignore[no-untyped-def]
    """Parts of any size (a burst of requests from every stream of a batch: hundreds of parts,
    blocks filled across them) give exactly the posteriors of their concatenation."""
    output = numpy_model.network.output
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    parts = [rng.normal(scale=2.0, size=(size, output.input_dim)).astype(np.float32) for size in sizes]
    columns = np.array([0, 976, 1462])
    whole = np.concatenate(parts) if parts else np.zeros((0, output.input_dim), np.float32)
    expected = output.posteriors(whole, columns)
    got = output.posteriors_of(iter(parts), columns)
    assert got.shape == expected.shape == (sum(sizes), 3)
    np.testing.assert_array_equal(got, expected)


def test_output_layer_survives_a_logit_far_above_the_selected_ones() -> None:
    """Rows are shifted by their largest *selected* logit; one that overflows is redone exactly."""
    layers, network = small_network()
    weight, bias = layers[-2].weight, layers[-2].bias
    # A hidden row whose logit 3 exceeds logits 0 and 1 by ~200: exp(200) overflows float32.
    direction = np.linalg.lstsq(weight, np.array([0.0, 0.0, 0.0, 200.0]) - bias, rcond=None)[0]
    hidden = np.stack([direction, np.zeros(3)]).astype(np.float32)
    got = network.output.posteriors(hidden, np.array([0, 1]))  # warnings are errors in tests
    expected = reference_forward(layers[-2:], hidden)[:, [0, 1]]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-7)


@pytest.mark.parametrize(
    "sizes",
    [[1, 0, 2, 1, 3, 2], [3, 4, 3, 3, 4, 0], [40, 35, 50], [3, 60, 0, 7], [5, 5, 5, 5]],
)
def test_hidden_many_equals_each_stream_alone(sizes: list[int]) -> None:
    """Short chunks and long ones, streams fed in step or not, in any order: the same rows as
    each stream alone, handed back in the streams' order."""
    _, network = small_network()
    rng = np.random.default_rng(len(sizes) + sum(sizes))
    alone = [network.new_state() for _ in sizes]
    together = [network.new_state() for _ in sizes]
    for step in range(8):
        chunks = [rng.normal(size=(max(0, size - step % 3), 6)).astype(np.float32) for size in sizes]
        expected = [network.hidden(state, chunk) for state, chunk in zip(alone, chunks, strict=True)]
        got = network.hidden_many(together, chunks)
        for want, have in zip(expected, got, strict=True):
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)  # float32 products in other shapes


def test_streams_keep_their_memory_when_the_slots_grow_and_are_reused() -> None:
    """A batch keeps its streams' FSMN inputs in slots of shared arrays: streams started later
    (in new blocks: a batch spans several), streams ended (their slots go to new ones), a long
    chunk (a store of its own) and a stream alone between batches still give the rows of each
    stream alone."""
    import gc

    _, network = small_network()
    rng = np.random.default_rng(5)
    alone = [network.new_state() for _ in range(3)]
    together = [network.new_state() for _ in range(3)]
    for step in range(10):
        if step in (2, 5):  # more streams: the shared arrays grow
            alone += [network.new_state() for _ in range(3 * step)]
            together += [network.new_state() for _ in range(3 * step)]
        if step == 7:  # streams end and new ones take their slots
            del alone[1:4], together[1:4]
            gc.collect()
            alone += [network.new_state() for _ in range(2)]
            together += [network.new_state() for _ in range(2)]
        sizes = [80 if step == 4 and i == 0 else 3 + (i + step) % 2 for i in range(len(together))]
        chunks = [rng.normal(size=(size, 6)).astype(np.float32) for size in sizes]
        expected = [network.hidden(state, chunk) for state, chunk in zip(alone, chunks, strict=True)]
        if step == 8:  # one stream alone takes the one-stream path
            got = [network.hidden(together[0], chunks[0]), *network.hidden_many(together[1:], chunks[1:])]
        else:
            got = network.hidden_many(together, chunks)
        for want, have in zip(expected, got, strict=True):
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)


def test_streams_in_the_later_slots_fed_alone_or_in_batches_give_the_rows_of_a_stream_alone() -> None:
    """Slots past the pool's first blocks hold little more than a layer's history and
    look-ahead: their streams fed in batches, alone with short chunks of every size (moving
    their rows to the front more often), with a long chunk, then in batches again, give the rows
    each stream gives alone (on a network of its own, in a roomy slot), and stay in their slots."""
    from edge_agent.engine.network import _SlotPool

    _, network = small_network()
    roomy = [network.new_state() for _ in range(_SlotPool._ROOMY_SLOTS)]
    together = [network.new_state() for _ in range(6)]
    assert together[0].buffers[0]._store.shape[0] < roomy[0].buffers[0]._store.shape[0]
    _, reference = small_network()
    alone = [reference.new_state() for _ in together]
    rng = np.random.default_rng(12)
    plan = [None, None, *range(1, 10), None, 80, None, None, 2, 2, 2, None, None]
    for step, lone in enumerate(plan):
        if lone is None:  # a batch, in step
            chunks = [rng.normal(size=(3 + (i + step) % 2, 6)).astype(np.float32) for i in range(6)]
            got = network.hidden_many(together, chunks)
            expected = [reference.hidden(state, chunk) for state, chunk in zip(alone, chunks, strict=True)]
        else:  # the first stream alone
            chunk = rng.normal(size=(lone, 6)).astype(np.float32)
            got, expected = [network.hidden(together[0], chunk)], [reference.hidden(alone[0], chunk)]
        for want, have in zip(expected, got, strict=True):
            assert have.shape == want.shape
            np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-5)
    assert all(buffer.in_slot for state in together for buffer in state.buffers)
    assert all(state.slotted for state in together)  # the last batch read them from their slots


def test_streams_started_on_many_threads_get_slots_of_their_own() -> None:
    """Streams may be created on any thread (the engine worker, HTTP requests): every state
    gets a slot no other live state has."""
    import threading

    _, network = small_network()
    states: list[list[object]] = [[] for _ in range(6)]
    start = threading.Barrier(len(states))

    def create(mine: list[object]) -> None:
        start.wait()
        mine.extend(network.new_state() for _ in range(60))

    threads = [threading.Thread(target=create, args=(mine,)) for mine in states]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    slots = [state.slot for mine in states for state in mine]  # type: ignore[attr-defined]
    assert len(set(slots)) == len(slots) == 360


def test_streams_fed_in_step_share_one_filter_pass_per_layer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """64 streams with chunks of 3 or 4 frames, mixed: per FSMN layer one pass for those of 3
    and one for those of 4, not one per stream."""
    from edge_agent.engine import network as network_module

    _, network = small_network()
    layers = len(network._fsmn_layers)
    passes: list[int] = []  # streams in each filter pass
    original = network_module._stream_windows

    def counted(rows: np.ndarray, taps: int) -> np.ndarray:
        passes.append(rows.shape[0])
        return original(rows, taps)

    monkeypatch.setattr(network_module, "_stream_windows", counted)
    rng = np.random.default_rng(11)
    states = [network.new_state() for _ in range(64)]
    for _ in range(4):  # past the first chunks, while the layers' buffers fill up
        network.hidden_many(states, [rng.normal(size=(3 + i % 2, 6)).astype(np.float32) for i in range(64)])
    passes.clear()
    network.hidden_many(states, [rng.normal(size=(3 + i % 2, 6)).astype(np.float32) for i in range(64)])
    assert len(passes) == 2 * layers and sorted(set(passes)) == [32]


def test_a_network_without_a_final_affine_and_softmax_is_refused() -> None:
    layers = random_fsmn_network(seed=1)
    relu_before_softmax = [*layers[:-1], Layer("RectifiedLinear", 4, 4), layers[-1]]
    with pytest.raises(ValueError, match="AffineTransform followed by a Softmax"):
        NumpyNetwork(parse_nnet(binary_nnet(relu_before_softmax), "odd.net"))


def test_each_weight_matrix_is_held_once() -> None:
    """The network keeps the transposed copies its products use, and the components it keeps
    see them as their weights: the matrices read from the file are let go with the reader's
    components, and the outputs are those of the file's weights."""
    import gc
    import weakref

    from edge_agent.engine.kaldi_nnet import AffineTransform, LinearTransform

    layers, _ = small_network()
    components = parse_nnet(binary_nnet(layers), "small.net")
    parsed = [weakref.ref(c.weight) for c in components if isinstance(c, (AffineTransform, LinearTransform))]
    expected = [c.weight.copy() for c in components if isinstance(c, (AffineTransform, LinearTransform))]
    network = NumpyNetwork(components)
    del components
    gc.collect()
    assert parsed and all(ref() is None for ref in parsed)
    kept = [c.weight for c in network.components if isinstance(c, (AffineTransform, LinearTransform))]
    assert all(np.array_equal(weight, copy) for weight, copy in zip(kept, expected, strict=True))
    assert all(weight.T.flags.c_contiguous and not weight.flags.owndata for weight in kept)
    features = np.random.default_rng(2).normal(size=(17, 6)).astype(np.float32)
    got = network.forward(network.new_state(), features, final=True)
    np.testing.assert_allclose(got, reference_forward(layers, features), atol=1e-5)
