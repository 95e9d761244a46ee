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
    for c, h, w, k in [(1, 8, 8, 10), (3, 28, 20, 4), (1, 1, 1, 2)]:
        model = _model(in_channels=c, height=h, width=w, num_classes=k).eval()
        assert model(torch.randn(5, c, h, w)).shape == (5, k)


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
