"""Batch-1 latency of 32/64 architectures on 28x28 (random weights): ORT fp32 1/2 threads, torch eager, the floor.

python tools/perf_lab/exp_arch_floor.py [A B C D E]
How far would the architecture have to shrink for fp32 batch 1 to come within 4x of an empty run?
A: classic (conv+pool, conv+pool); B: conv+pool, conv stride 2; C: both convs stride 2;
D: conv + pool 4, conv + pool 2; E: pool the input first, then the classic blocks.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
import lab  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from exp_floor import identity_model  # noqa: E402
from torch import nn  # noqa: E402


class Net(nn.Sequential):
    def forward(self, x):  # a named argument, as lab.export_fp32's dynamic_shapes expects
        return super().forward(x)


def conv(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1)


FEATURES = {
    "A": ([conv(1, 32), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64), nn.ReLU(), nn.MaxPool2d(2)], 64 * 7 * 7),
    "B": ([conv(1, 32), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64, 2), nn.ReLU()], 64 * 7 * 7),
    "C": ([conv(1, 32, 2), nn.ReLU(), conv(32, 64, 2), nn.ReLU()], 64 * 7 * 7),
    "D": ([conv(1, 32), nn.ReLU(), nn.MaxPool2d(4), conv(32, 64), nn.ReLU(), nn.MaxPool2d(2)], 64 * 3 * 3),
    "E": ([nn.MaxPool2d(2), conv(1, 32), nn.ReLU(), nn.MaxPool2d(2), conv(32, 64), nn.ReLU(), nn.MaxPool2d(2)], 64 * 3 * 3),
}


def net(kind):
    layers, features = FEATURES[kind]
    return Net(*layers, nn.Flatten(), nn.Dropout(0.5), nn.Linear(features, 128), nn.ReLU(), nn.Dropout(0.5),
               nn.Linear(128, 10)).eval()


def flops(model):
    total, x = 0, torch.zeros(1, 1, 28, 28)
    for layer in model:
        y = layer(x)
        if isinstance(layer, nn.Conv2d):
            total += 2 * y.numel() * layer.in_channels * 9
        if isinstance(layer, nn.Linear):
            total += 2 * layer.in_features * layer.out_features
        x = y
    return total


def main():
    kinds = sys.argv[1:] or list(FEATURES)
    x1 = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    t1 = torch.from_numpy(x1)
    empty = lab.session(identity_model((1, 28, 28)), 1)
    cases = {"empty": lambda: empty.run(None, {"input": x1})}
    torch.set_num_threads(1)

    def ort_case(session):
        return lambda: session.run(None, {"input": x1})

    def torch_case(model):
        def run():
            with torch.inference_mode():
                model(t1)
        return run

    for kind in kinds:
        model = net(kind)
        onnx_bytes = lab.export_fp32(model, (1, 28, 28))
        print(kind, "MFLOP", flops(model) / 1e6, flush=True)
        cases[f"{kind}_ort1"] = ort_case(lab.session(onnx_bytes, 1))
        cases[f"{kind}_ort2"] = ort_case(lab.session(onnx_bytes, 2))
        cases[f"{kind}_torch"] = torch_case(model)
    for name, ts in lab.interleaved(cases, 15, inner=50).items():
        print(f"{name:10} {lab.med(ts) * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
