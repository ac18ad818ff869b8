"""heal_topk benchmark: how much of the end-to-end KL heal's top-K target cache keeps.

Past its memory budget, heal's e2e target cache keeps the original's logits as their K likeliest entries per token
(`passes/heal.py` `TopLogits`) and trains on the KL between the distributions coarsened to those entries plus one
bucket for the rest, a lower bound of the full KL. This measures the two on a one-shot compressed SmolLM2 against
the dense one, on windows of Macbeth (text no pass calibrates on):

    python benchmarks/heal_topk.py [--passes 'prune(ffn=0.3,importance=activation)'] [--k 64,256,1024]
                                   [--calib-samples 16] [--eval-samples 4] [--seq-len 256]

Writes docs/results/heal_topk.json: one row per K with the full KL, the coarsened KL, their ratio and the mean
probability mass the original puts on its K entries.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
EVAL_PLAY = "Macbeth"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", default="prune(ffn=0.3,importance=activation)")
    parser.add_argument("--k", default="64,256,1024")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "heal_topk.json"))
    args = parser.parse_args()

    import torch

    import modelsurgeon
    from heal import run_pipeline
    from modelsurgeon import calibration as cal
    from modelsurgeon.context import PassContext
    from modelsurgeon.models import real
    from modelsurgeon.passes.heal import TopLogits, _kl
    from modelsurgeon.runtime.benchmark import machine_info
    from modelsurgeon.runtime.session import make_session

    torch.set_num_threads(args.threads)
    texts = real.shakespeare_texts()
    tokenizer = cal.load_tokenizer(real.smollm2_tokenizer())
    dense = pathlib.Path(real.smollm2_onnx())
    ids = cal.tokenize_texts([t for title, t in texts.items() if title != EVAL_PLAY], tokenizer,
                             num_samples=args.calib_samples, seq_len=128, warn=False)
    model = modelsurgeon.load(dense)
    ctx = PassContext(model=model, calibration=cal.from_token_ids(model, ids, source="shakespeare"), progress=False)
    t0 = time.perf_counter()
    model, _ = run_pipeline(model, ctx, args.passes)
    pass_seconds = time.perf_counter() - t0
    window = cal.tokenize_texts([texts[EVAL_PLAY]], tokenizer, num_samples=args.eval_samples, seq_len=args.seq_len,
                                warn=False)

    def logits(path) -> np.ndarray:
        session = make_session(path)
        names = {i.name for i in session.get_inputs()}
        feeds = {"input_ids": window, "attention_mask": np.ones_like(window),
                 "position_ids": np.broadcast_to(np.arange(window.shape[1]), window.shape).copy()}
        return session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0]

    with tempfile.TemporaryDirectory() as tmp:
        cut = pathlib.Path(tmp) / "cut.onnx"
        modelsurgeon.save(model, cut)
        ref, out = logits(dense), torch.from_numpy(logits(cut))
    full = float(_kl(out, torch.from_numpy(ref)))
    rows = []
    for k in (int(x) for x in args.k.split(",")):
        top = TopLogits.of(ref, k).for_loss()
        coarse = float(_kl(out, top))
        mass = float(torch.exp(torch.logsumexp(top.logq, -1)).mean())
        rows.append({"passes": args.passes, "K": k, "tokens": int(window.size), "full KL": round(full, 4),
                     "top-K KL": round(coarse, 4), "top-K / full": round(coarse / full, 3),
                     "mass on top K": round(mass, 4)})
        print(rows[-1], flush=True)
    doc = {"benchmark": "heal_topk", "command": "python benchmarks/heal_topk.py " + " ".join(sys.argv[1:]),
           "machine": machine_info(), "rows": rows,
           "notes": [f"SmolLM2-135M after one-shot {args.passes} (calibrated on {args.calib_samples} x 128 tokens of "
                     f"the other plays, {pass_seconds:.0f} s), against the dense model on {args.eval_samples} x "
                     f"{args.seq_len} tokens of {EVAL_PLAY}; KL(original || compressed) per token, mean",
                     "top-K KL: both distributions coarsened to the original's K likeliest entries plus one bucket "
                     "for the rest (heal's target cache past its memory budget); a lower bound of the full KL"]}
    out_path = pathlib.Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
