"""What a gated zoo model's SViT gates keep at inference on a split of the generated benchmark.

    PYTHONPATH=. python scripts/svit_keep.py --model videomae-synth-svit --split val

Per gated block: the fraction of tokens kept by the inference rule (keep iff the keep logit
wins; ``models.svit_training.measure_keep``), the mean keep probability (what the training's
keep-ratio loss holds to the target while the Gumbel noise is on), and the median distance of
the keep-logit margin ``log p(keep) - log p(prune)`` from 0 (how far from a tie the decisions
are). Detection: every ``--every``-th frame of the split's videos; recognition: the first
``--limit`` clips. The figures of docs/RESULTS.md's SViT notes come from this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import numpy as np
    import torch

    from models import build_method
    from models.registry import build_zoo_model
    from models.methods.svit import gates_of, sparse_block
    from models.runner import StreamRunner
    from models.svit_training import _embed, measure_keep
    from pipeline.training_data import load_detection_frames, load_recognition_clips

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="zoo entry with SViT gates")
    ap.add_argument("--zoo-dir", help="read the entry from this folder instead of models/zoo")
    ap.add_argument("--data", default="runs/synth", help="the --out folder of vidprune generate")
    ap.add_argument("--split", default="val", choices=("train", "val", "test"))
    ap.add_argument("--limit", type=int, default=96, help="recognition: clips (default 96)")
    ap.add_argument("--every", type=int, default=20, help="detection: frame step (default 20)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = build_zoo_model(args.model, args.zoo_dir).eval()
    gates = gates_of(model.backbone)
    prep = StreamRunner(model, build_method("none"))
    root = Path(args.data) / model.task
    if model.task == "detection":
        frames = load_detection_frames(root, args.split, every=args.every).frames
        x = torch.stack([prep.preprocess_detection(np.ascontiguousarray(f))[0] for f in frames])
    else:
        clips = load_recognition_clips(root, args.split, limit=args.limit).clips
        x = torch.stack([torch.stack([prep.preprocess_recognition(np.ascontiguousarray(f))
                                      for f in c], dim=1) for c in clips])
    fractions, probabilities, margins = [], [], []
    with torch.no_grad():
        for s in range(0, len(x), 8):
            m = measure_keep(model, x[s:s + 8])
            fractions.append(m.fraction)
            probabilities.append(m.probability)
            emb = _embed(model, x[s:s + 8])
            h, p = emb.tokens, emb.prefix
            per_gate = []
            for i, blk in enumerate(model.backbone.blocks):
                gate = gates.gate(i)
                if gate is None:
                    h, _ = blk(h, emb.grid, p)
                    continue
                logp = gate(h[:, p:])
                per_gate.append((logp[..., 0] - logp[..., 1]).abs().flatten())
                h = sparse_block(blk, h, logp[..., 0] > logp[..., 1], emb.grid, p, None)
            margins.append(per_gate)
    margin = [float(torch.cat([b[g] for b in margins]).median()) for g in range(len(gates.gates))]
    print(f"{args.model} on {len(x)} {args.split} {'frames' if model.task == 'detection' else 'clips'}")
    print("keep target        ", " ".join(f"{v:.3f}" for v in gates.keep_ratios))
    print("kept at inference  ", " ".join(f"{v:.3f}" for v in np.mean(fractions, axis=0)))
    print("keep probability   ", " ".join(f"{v:.3f}" for v in np.mean(probabilities, axis=0)))
    print("median |margin|    ", " ".join(f"{v:.3f}" for v in margin))
    return 0


if __name__ == "__main__":
    sys.exit(main())
