"""The dropout CNN: structure, and dropout that is active in train() and the identity in eval()."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.model import DropoutCNN


def _model(**overrides) -> DropoutCNN:
    torch.manual_seed(0)
    return DropoutCNN(ModelConfig(**{"conv_channels": (4, 8), "fc_units": (16,), **overrides}))


def test_dropout_stands_before_every_fully_connected_layer():
    layers = list(_model().classifier)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Flatten", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert all(layer.p == 0.5 for layer in layers if isinstance(layer, nn.Dropout))


def test_output_shape_for_several_input_shapes():
    for strided in (True, False):
        for c, h, w, k in [(1, 8, 8, 10), (3, 28, 20, 4), (1, 7, 9, 3), (1, 1, 1, 2)]:
            model = _model(in_channels=c, height=h, width=w, num_classes=k, strided_first_conv=strided).eval()
            assert model(torch.randn(5, c, h, w)).shape == (5, k)


def test_first_block_downsamples_by_stride_or_by_max_pool():
    strided, pooled = _model(height=28, width=28), _model(height=28, width=28, strided_first_conv=False)
    assert strided.features[0].stride == (2, 2) and strided.features[0].kernel_size == (5, 5)
    assert pooled.features[0].stride == (1, 1) and pooled.features[0].kernel_size == (3, 3)
    # The second block pools in both; only the first block differs.
    assert [type(m).__name__ for m in strided.features].count("MaxPool2d") == 1
    assert [type(m).__name__ for m in pooled.features].count("MaxPool2d") == 2
    assert strided.classifier[2].in_features == pooled.classifier[2].in_features == 8 * 7 * 7


def test_first_block_is_strided_by_default_from_16x16_up():
    assert _model(height=28, width=28).features[0].stride == (2, 2)
    assert _model(height=16, width=20).features[0].stride == (2, 2)
    assert _model(height=15, width=28).features[0].stride == (1, 1)
    assert _model(height=8, width=8).features[0].stride == (1, 1)
    # An explicit choice wins over the size.
    assert _model(height=8, width=8, strided_first_conv=True).features[0].stride == (2, 2)
    assert _model(height=28, width=28, strided_first_conv=False).features[0].stride == (1, 1)


def test_a_record_without_the_stride_field_rebuilds_the_pooled_model():
    """Checkpoints written before `strided_first_conv` existed describe the max-pooled first block."""
    old_record = {"conv_channels": [4, 8], "fc_units": [16], "height": 28, "width": 28}
    assert ModelConfig.from_dict(old_record).strided_first_conv is False
    assert ModelConfig.from_dict({**old_record, "strided_first_conv": True}).strided_first_conv is True


def test_eval_is_deterministic_and_train_is_stochastic():
    model, x = _model(spatial_dropout=0.2), torch.randn(16, 1, 8, 8)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_dropout_zero_makes_train_and_eval_identical():
    model, x = _model(dropout=0.0), torch.randn(16, 1, 8, 8)
    assert not any(isinstance(m, (nn.Dropout, nn.Dropout2d)) for m in model.modules())
    assert torch.equal(model.train()(x), model.eval()(x))


def test_spatial_dropout_and_batch_norm_are_optional_blocks():
    kinds = [type(m).__name__ for m in _model(spatial_dropout=0.1, batch_norm=True).features]
    assert kinds.count("Dropout2d") == 2 and kinds.count("BatchNorm2d") == 2
    assert "Dropout2d" not in [type(m).__name__ for m in _model().features]


@pytest.mark.parametrize("field,value,message", [("dropout", 1.0, "dropout"), ("dropout", -0.1, "dropout"),
                                                 ("spatial_dropout", 1.0, "spatial dropout"),
                                                 ("conv_channels", (), "conv channels"), ("num_classes", 1, "2 classes")])
def test_invalid_model_config_is_refused(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value})
