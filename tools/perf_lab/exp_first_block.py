"""int8/fp32 at batch 256 (2 threads) and batch 1 (1 thread) for first-block variants, random weights, MNIST calibration.

python tools/perf_lab/exp_first_block.py [64/128 32/64]   (latency does not depend on the weights' values)
Variants of the first block: classic (conv 3x3 + max pool), stride2 (conv 3x3 stride 2), stride2_5x5
(conv 5x5 stride 2: the shipped default), s2d (2x2 space-to-depth, then conv 3x3 on 4 channels).
Each as fp32, int8 with the first Conv in fp32, and int8 throughout (QDQ U8S8 per-tensor,
QDQPropagationTransformer disabled).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
import lab  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

NOPROP = ["QDQPropagationTransformer"]


class Net(nn.Sequential):
    def forward(self, x):  # a named argument, as lab.export_fp32's dynamic_shapes expects
        return super().forward(x)


class SpaceToDepth(nn.Module):
    def forward(self, x):
        return nn.functional.pixel_unshuffle(x, 2)


def first_block(kind, c1):
    return {"classic": [nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)],
            "stride2": [nn.Conv2d(1, c1, 3, stride=2, padding=1), nn.ReLU()],
            "stride2_5x5": [nn.Conv2d(1, c1, 5, stride=2, padding=2), nn.ReLU()],
            "s2d": [SpaceToDepth(), nn.Conv2d(4, c1, 3, padding=1), nn.ReLU()]}[kind]


def net(kind, c1, c2):
    torch.manual_seed(0)
    return Net(*first_block(kind, c1), nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
               nn.Dropout(0.5), nn.Linear(c2 * 49, 128), nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)).eval()


def runner(session, x):
    return lambda: session.run(None, {"input": x})


def main():
    widths = [tuple(int(v) for v in w.split("/")) for w in (sys.argv[1:] or ["64/128"])]
    splits = lab.load_splits()
    calib = np.asarray(splits.x_train[:256], dtype=np.float32)
    x256 = np.random.default_rng(0).standard_normal((256, 1, 28, 28)).astype(np.float32)
    x1 = x256[:1]
    for c1, c2 in widths:
        s256, s1 = {}, {}
        for kind in ("classic", "stride2", "stride2_5x5", "s2d"):
            fp32 = lab.export_fp32(net(kind, c1, c2))
            first_conv = lab.node_names(fp32, "Conv")[:1]
            variants = {"fp32": (fp32, ()),
                        "int8_first_fp32": (lab.quantize(fp32, calib, per_channel=False, exclude=first_conv), NOPROP),
                        "int8_all": (lab.quantize(fp32, calib, per_channel=False), NOPROP)}
            for name, (model, disabled) in variants.items():
                s256[f"{kind}:{name}"] = lab.session(model, 2, disabled=disabled)
                s1[f"{kind}:{name}"] = lab.session(model, 1, disabled=disabled)
        r256 = lab.interleaved({k: runner(s, x256) for k, s in s256.items()}, 8, inner=3)
        r1 = lab.interleaved({k: runner(s, x1) for k, s in s1.items()}, 10, inner=30)
        print(f"== {c1}/{c2}")
        classic256 = lab.med(r256["classic:fp32"])
        for k in s256:
            kind = k.split(":")[0]
            t256, t1 = lab.med(r256[k]), lab.med(r1[k])
            own256, own1 = lab.med(r256[f"{kind}:fp32"]), lab.med(r1[f"{kind}:fp32"])
            print(f"{k:28} b256 {t256 * 1e3:7.2f} ms  speedup vs own fp32 {own256 / t256:5.2f}  "
                  f"vs classic fp32 {classic256 / t256:5.2f} | b1 {t1 * 1e6:7.1f} us  speedup {own1 / t1:5.2f}", flush=True)


if __name__ == "__main__":
    main()
