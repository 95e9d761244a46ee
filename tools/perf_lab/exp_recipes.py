"""Interleaved timing + accuracy of int8 recipes vs fp32 for one trained model.

python tools/perf_lab/exp_recipes.py WEIGHTS [--rounds 15] [--recipes SPEC ...]

A recipe SPEC is comma-separated tokens: format (qdq|qop), activation+weight types (u8s8|s8s8|u8u8),
pc|pt (per-channel / per-tensor), rr (reduce_range), pre (quant_pre_process), x1 (first Conv
kept fp32), noprop (session disables QDQPropagationTransformer), ext (ORT_ENABLE_EXTENDED),
nhwc (model flattened in H, W, C order). `fp32` and `fp32,nhwc` / `fp32,ext` are the baselines.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import lab  # noqa: E402

DEFAULT = ["qdq,u8s8,pc", "qdq,u8s8,pt", "qdq,s8s8,pt", "qdq,s8s8,pc", "qdq,u8u8,pt", "qop,u8s8,pc", "qop,s8s8,pc",
           "qdq,u8s8,pc,rr", "qdq,u8s8,pc,pre", "qdq,u8s8,pc,x1", "qdq,u8s8,pc,x1,noprop", "qdq,u8s8,pt,x1,noprop",
           "qdq,s8s8,pt,x1,noprop"]


def build(spec: str, fp32: dict, calib, first_conv) -> tuple[bytes, list, str]:
    t = set(spec.split(","))
    src = fp32["nhwc" if "nhwc" in t else "nchw"]
    level = "extended" if "ext" in t else "all"
    disabled = ["QDQPropagationTransformer"] if "noprop" in t else []
    if "fp32" in t:
        return src, disabled, level
    types = next((x for x in ("u8s8", "s8s8", "u8u8") if x in t), "u8s8")
    b = lab.quantize(src, calib, fmt="qop" if "qop" in t else "qdq", act=types[:2], wt=types[2:],
                     per_channel="pt" not in t, reduce_range="rr" in t, preprocess="pre" in t,
                     exclude=[first_conv] if "x1" in t else [])
    return b, disabled, level


def main():
    p = argparse.ArgumentParser()
    p.add_argument("weights")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--recipes", nargs="*", default=DEFAULT)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--out", default="")
    a = p.parse_args()
    splits = lab.load_splits()
    pre = splits.preprocess
    calib = pre.apply(splits.x_train[:a.calib])
    x_test, y_test = pre.apply(splits.x_test), splits.y_test
    model = lab.load_weights(a.weights)
    fp32 = {"nchw": lab.export_fp32(model)}
    if any("nhwc" in r for r in a.recipes):
        fp32["nhwc"] = lab.export_fp32(lab.with_nhwc_flatten(model))
    first_conv = lab.node_names(fp32["nchw"], "Conv")[0]
    specs = ["fp32"] + [r for r in a.recipes if r != "fp32"]
    built = {s: build(s, fp32, calib, first_conv) for s in specs}
    for s, (b, _, _) in built.items():
        Path(f"/tmp/perf/{s.replace(',', '_')}.onnx").write_bytes(b)
    s256 = {n: lab.session(b, 2, level=lv, disabled=d) for n, (b, d, lv) in built.items()}
    s1 = {n: lab.session(b, 1, level=lv, disabled=d) for n, (b, d, lv) in built.items()}
    res = {n: {"acc": lab.accuracy(s, x_test, y_test), "bytes": len(built[n][0])} for n, s in s256.items()}
    x256, x1 = x_test[:256], x_test[:1]
    t256 = lab.interleaved({n: (lambda s=s: s.run(None, {"input": x256})) for n, s in s256.items()}, a.rounds, inner=4)
    t1 = lab.interleaved({n: (lambda s=s: s.run(None, {"input": x1})) for n, s in s1.items()}, a.rounds, inner=40)
    b256, b1 = lab.med(t256["fp32"]), lab.med(t1["fp32"])
    m256, m1 = min(t256["fp32"]), min(t1["fp32"])
    print(f"{'recipe':26s} {'acc':>6s} {'KB':>5s} {'b256 ms':>8s} {'x fp32':>6s} {'(min)':>6s} "
          f"{'b1 us':>7s} {'x fp32':>6s} {'(min)':>6s}")
    for n in built:
        r = res[n]
        r.update(b256_ms=lab.med(t256[n]) * 1e3, b256_speedup=b256 / lab.med(t256[n]), b256_speedup_min=m256 / min(t256[n]),
                 b1_us=lab.med(t1[n]) * 1e6, b1_speedup=b1 / lab.med(t1[n]), b1_speedup_min=m1 / min(t1[n]))
        print(f"{n:26s} {r['acc'] * 100:6.2f} {r['bytes'] / 1024:5.0f} {r['b256_ms']:8.2f} {r['b256_speedup']:6.2f} "
              f"{r['b256_speedup_min']:6.2f} {r['b1_us']:7.1f} {r['b1_speedup']:6.2f} {r['b1_speedup_min']:6.2f}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
