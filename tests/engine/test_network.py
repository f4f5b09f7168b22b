from __future__ import annotations

import numpy as np
import pytest

from edge_agent.engine.kaldi_nnet import parse_nnet
from edge_agent.engine.network import NumpyNetwork
from tests.engine.nnet_files import binary_nnet, random_fsmn_network, reference_forward


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
    torch_network = pytest.importorskip("edge_agent.engine.torch_network")
    layers = random_fsmn_network(seed=9)
    network = torch_network.TorchNetwork(parse_nnet(binary_nnet(layers), "small.net"))
    features = np.random.default_rng(3).normal(size=(17, 6)).astype(np.float32)
    np.testing.assert_allclose(
        run_chunked(network, features, [2, 5]), reference_forward(layers, features), atol=1e-5
    )
