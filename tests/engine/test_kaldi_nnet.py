from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.engine.kaldi_nnet import (
    AffineTransform,
    Fsmn,
    LinearTransform,
    NnetFormatError,
    RectifiedLinear,
    Softmax,
    parse_nnet,
    read_nnet,
)
from tests.engine.nnet_files import binary_nnet, random_fsmn_network, text_nnet


@pytest.mark.parametrize("writer", [binary_nnet, text_nnet], ids=["binary", "text"])
def test_reads_every_component_with_its_values(writer) -> None:  # type: ignore[no-untyped-def]
    layers = random_fsmn_network()
    components = parse_nnet(writer(layers), "small.net")
    assert [type(c).__name__ for c in components] == [layer.tag for layer in layers]
    for layer, component in zip(layers, components, strict=True):
        if isinstance(component, AffineTransform):
            np.testing.assert_allclose(component.weight, layer.weight, rtol=1e-6)
            np.testing.assert_allclose(component.bias, layer.bias, rtol=1e-6)
        elif isinstance(component, LinearTransform):
            np.testing.assert_allclose(component.weight, layer.weight, rtol=1e-6)
        elif isinstance(component, Fsmn):
            np.testing.assert_allclose(component.left, layer.left, rtol=1e-6)
            np.testing.assert_allclose(component.right, layer.right, rtol=1e-6)
            assert (component.left_stride, component.right_stride) == layer.strides
        assert (component.output_dim, component.input_dim) == (layer.out_dim, layer.in_dim)


def test_fsmn_context_sizes_follow_orders_and_strides() -> None:
    fsmn = [c for c in parse_nnet(binary_nnet(random_fsmn_network())) if isinstance(c, Fsmn)]
    assert [(f.history_frames, f.lookahead_frames) for f in fsmn] == [(2, 2), (2, 1)]


def test_truncated_binary_file_names_file_offset_and_expectation() -> None:
    data = binary_nnet(random_fsmn_network())
    cut = len(data) // 2
    with pytest.raises(NnetFormatError) as error:
        parse_nnet(data[:cut], "cut.net")
    message = str(error.value)
    assert message.startswith("cut.net: byte ")
    assert "unexpected end of file" in message
    assert 0 < error.value.offset <= cut


def test_every_truncation_point_gives_a_format_error_not_a_crash() -> None:
    data = binary_nnet(random_fsmn_network(dim_in=3, hidden=2, outputs=2))
    for cut in range(len(data)):
        with pytest.raises(NnetFormatError):
            parse_nnet(data[:cut], "cut.net")


def test_unknown_component_is_named_with_its_offset() -> None:
    data = binary_nnet(random_fsmn_network())
    data = data.replace(b"<RectifiedLinear> ", b"<Sigmoid> ", 1)
    with pytest.raises(NnetFormatError) as error:
        parse_nnet(data, "odd.net")
    assert "unknown component '<Sigmoid>'" in str(error.value)
    assert error.value.offset == data.index(b"<Sigmoid>")


def test_wrong_size_byte_is_reported() -> None:
    data = bytearray(binary_nnet(random_fsmn_network()))
    first_int = data.index(b"<AffineTransform> ") + len(b"<AffineTransform> ")
    data[first_int] = 8
    with pytest.raises(NnetFormatError, match=r"size byte 4.*found size byte 8"):
        parse_nnet(bytes(data), "bad.net")


def test_dimension_mismatch_between_components_is_refused() -> None:
    layers = random_fsmn_network()
    layers[1].in_dim = layers[1].out_dim = 99  # the relu no longer matches the affine before it
    with pytest.raises(NnetFormatError, match=r"expects input dimension 99"):
        parse_nnet(binary_nnet(layers), "mismatch.net")


def test_matrix_shape_must_match_declared_dimensions() -> None:
    layers = random_fsmn_network()
    layers[0].weight = np.ones((layers[0].out_dim, layers[0].in_dim + 1))
    with pytest.raises(NnetFormatError, match=r"weights has shape"):
        parse_nnet(binary_nnet(layers), "shape.net")


def test_not_a_network() -> None:
    with pytest.raises(NnetFormatError, match=r"expected '<Nnet>'"):
        parse_nnet(b"RIFF\x00\x00\x00\x00WAVE", "audio.wav")
    with pytest.raises(NnetFormatError, match=r"empty file"):
        parse_nnet(b"", "empty.net")


def test_text_matrix_with_non_number_is_reported() -> None:
    data = text_nnet(random_fsmn_network()).replace(b"<BiasLearnRateCoef> 1", b"<BiasLearnRateCoef> x", 1)
    with pytest.raises(NnetFormatError, match=r"expected a number"):
        parse_nnet(data, "text.net")


def test_trailing_garbage_is_refused() -> None:
    with pytest.raises(NnetFormatError, match=r"after '</Nnet>'"):
        parse_nnet(binary_nnet(random_fsmn_network()) + b"junk", "tail.net")


def test_real_kwsr_net_structure(model_dir: Path) -> None:
    components = read_nnet(model_dir / "kwsr.net")
    kinds = [type(c) for c in components]
    assert kinds[:3] == [AffineTransform, AffineTransform, RectifiedLinear]
    assert kinds[-3:] == [AffineTransform, AffineTransform, Softmax]
    fsmn = [c for c in components if isinstance(c, Fsmn)]
    assert len(fsmn) == 4
    assert all(f.left.shape == (10, 128) and f.right.shape == (2, 128) for f in fsmn)
    assert components[0].input_dim == 400 and components[-1].output_dim == 2599
    parameters = sum(
        c.weight.size + getattr(c, "bias", np.zeros(0)).size
        for c in components
        if isinstance(c, (AffineTransform, LinearTransform))
    ) + sum(f.left.size + f.right.size for f in fsmn)
    assert 700_000 < parameters < 800_000


def test_real_mvn_is_read_as_text(model_dir: Path) -> None:
    components = read_nnet(model_dir / "kwsr.mvn")
    assert [type(c).__name__ for c in components] == ["Splice", "AddShift", "Rescale"]
    assert components[1].shift.shape == (400,)
