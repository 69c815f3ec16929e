"""onnx.checker (full check) + onnxruntime Python run + comparison (see README.md)."""
import argparse
import json
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort


def load(base, spec):
    dtype = np.dtype(spec.get("dtype", "float32")).newbyteorder("<")
    return np.fromfile(os.path.join(base, spec["file"]), dtype=dtype).reshape(spec["shape"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("case")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()
    # A path (not a loaded proto) so external data is checked too.
    onnx.checker.check_model(a.model, full_check=True)
    model = onnx.load(a.model, load_external_data=False)
    with open(a.case) as f:
        case = json.load(f)
    base = os.path.dirname(os.path.abspath(a.case))
    sess = ort.InferenceSession(a.model, providers=["CPUExecutionProvider"])
    feeds = {k: load(base, v) for k, v in case["inputs"].items()}
    names = list(case["expected"])
    got = sess.run(names, feeds)
    diffs = {}
    for name, out in zip(names, got):
        exp = load(base, case["expected"][name])
        if out.shape != exp.shape:
            print(json.dumps({"error": f"{name}: shape {out.shape} != {exp.shape}"}))
            sys.exit(1)
        diffs[name] = float(np.max(np.abs(out.astype(np.float64) - exp.astype(np.float64))))
    report = {"checker": "ok", "ir_version": model.ir_version,
              "opset": [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")],
              "onnxruntime": ort.__version__, "max_abs_diff": diffs, "tol": a.tol}
    print(json.dumps(report))
    sys.exit(0 if all(d <= a.tol for d in diffs.values()) else 1)


if __name__ == "__main__":
    main()
