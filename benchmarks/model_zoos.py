"""Models nobody here wrote: timm, torchvision and transformers models through the public flow, as README documents it.

    .venv/bin/python benchmarks/model_zoos.py                    # every family below, ONNX included
    .venv/bin/python benchmarks/model_zoos.py --models timm:resnet18 torchvision:shufflenet_v2_x1_0
    .venv/bin/python benchmarks/model_zoos.py --no-onnx          # torch side only (faster)

Per model (random weights, seeded, its default input size, filter pruning at 0.5): plan →
a few ADMM steps → hard prune → masks applied (the guard stays attached) → one masked
training step → ``compact`` → ``export_onnx`` → ONNX Runtime output against the *masked*
model. A model counts as pruned when it loses at least 25 % of its MACs, compacts exactly and
exports with parity; every other model gets the one-line reason. MACs are counted by
``count_onnx`` on the dense and pruned exports. Writes benchmarks/results/model_zoos.json and .md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

import structadmm as sa

RESULTS = Path(__file__).parent / "results"

#: one model per family: the smallest variant, built from its config with random weights
TIMM_CNNS = [
    "resnet18", "resnet50d", "resnetv2_50", "resnext26ts", "seresnext26d_32x4d", "ecaresnet26t", "skresnet18",
    "resnest14d", "res2net50_14w_8s", "regnetx_002", "regnety_002", "rexnet_100", "ghostnet_100", "mixnet_s",
    "mobilenetv2_050", "mobilenetv3_small_100", "efficientnet_b0", "efficientnet_lite0", "tinynet_e",
    "fbnetv3_b", "hardcorenas_a", "lcnet_050", "mnasnet_050", "spnasnet_100", "repvgg_a0", "mobileone_s0",
    "cspresnet50", "cspdarknet53", "darknet17", "dpn68", "densenet121", "dla34", "vovnet39a", "ese_vovnet19b_dw",
    "hrnet_w18_small", "selecsls42b", "gernet_s", "xception41", "inception_v3", "tresnet_m", "nf_resnet26",
    "convnext_atto", "vgg11_bn", "repghostnet_050", "ghostnetv2_100", "efficientvit_b0", "edgenext_xx_small",
    "mobilevit_xxs", "fastvit_t8", "levit_128s", "efficientformer_l1",
]
TORCHVISION_CNNS = [
    "alexnet", "vgg11_bn", "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "densenet121",
    "squeezenet1_1", "googlenet", "inception_v3", "mobilenet_v2", "mobilenet_v3_small", "mnasnet0_5",
    "shufflenet_v2_x1_0", "efficientnet_b0", "efficientnet_v2_s", "regnet_x_400mf", "regnet_y_400mf",
    "convnext_tiny", "r3d_18", "mc3_18", "r2plus1d_18", "s3d",
]


#: transformers: attention heads and MLP neurons are the groups (issue: transformers too)
TIMM_TRANSFORMERS = ["vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_small_patch16_224",
                     "swin_tiny_patch4_window7_224"]
TORCHVISION_TRANSFORMERS = ["vit_b_16", "swin_t"]
HF_ENCODERS = ["bert"]


def build(name: str, size: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """``zoo:model`` with random weights and an input of its default size (or ``size``), batch 2.
    ``hf:bert`` is a BERT-base encoder from ``transformers`` built from its config, fed token ids
    (``size`` tokens, 128 by default)."""
    zoo, _, model_name = name.partition(":")
    torch.manual_seed(0)
    if zoo == "hf":
        from transformers import BertConfig, BertModel
        model = BertModel(BertConfig(), add_pooling_layer=False)
        return model, torch.randint(0, model.config.vocab_size, (2, size or 128))
    if zoo == "timm":
        import timm

        model = timm.create_model(model_name, pretrained=False)
        shape = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return model, torch.randn(2, shape[0], *(size or d for d in shape[1:]))
    import torchvision

    if model_name in torchvision.models.list_models(module=torchvision.models.video):
        model = torchvision.models.get_model(model_name, weights=None)
        frames, side = (16, 224) if model_name == "s3d" else (8, 112)  # S3D's kernels need its own clip size
        return model, torch.randn(2, 3, frames, size or side, size or side)
    kwargs = {"aux_logits": False, "init_weights": True} if model_name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(model_name, weights=None, **kwargs)
    size = size or (299 if model_name == "inception_v3" else 224)
    return model, torch.randn(2, 3, size, size)


def readme_flow(model: torch.nn.Module, x: torch.Tensor, folder: Path, *, ratio: float = 0.5, steps: int = 2,
                onnx: bool = True) -> dict:
    """The README's Python API flow on one model; returns what it measured."""
    model.train()
    plan = sa.PruningPlan.uniform(model, x, sparsity="filter", ratio=ratio)
    admm = sa.ADMM(model, plan)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def task_loss(out: Any) -> torch.Tensor:  # a classification loss on random labels: weights stay sane
        logits = (out if isinstance(out, torch.Tensor) else out[0]).float().flatten(1)
        labels = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=generator)
        return torch.nn.functional.cross_entropy(logits, labels)

    for _ in range(steps):
        loss = task_loss(model(x)) + admm.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        admm.update()
    masks = admm.hard_prune()
    guard = sa.apply_masks(model, masks)
    optimizer.zero_grad()
    task_loss(model(x)).backward()
    optimizer.step()
    guard.enforce()
    model.eval()
    small = sa.compact(model, x)
    reasons = Counter(why for _, why in plan.skipped)
    result = {"units": len(plan.units), "left_alone": len(plan.skipped),
              "left_alone_reason": reasons.most_common(1)[0][0] if reasons else None}
    if not onnx:
        dense = sum(p.numel() for p in model.parameters())
        kept = sum(p.numel() for p in small.parameters())
        result.update(param_ratio=dense / kept)
        return result
    sa.export_onnx(model, x, folder / "dense.onnx", verify=False)
    sa.export_onnx(small, x, folder / "pruned.onnx")
    with torch.no_grad():
        expected = model(x)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    import onnxruntime as ort

    session = ort.InferenceSession(str(folder / "pruned.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    diff = float(np.abs(got - expected.numpy()).max())
    dense_macs, pruned_macs = sa.count_onnx(folder / "dense.onnx").macs, sa.count_onnx(folder / "pruned.onnx").macs
    scale = max(1.0, float(expected.abs().max()))
    result.update(mac_ratio=dense_macs / pruned_macs, mac_saving=1 - pruned_macs / dense_macs, parity=diff,
                  parity_rel=diff / scale, parity_ok=diff <= 1e-3 * scale)
    return result


def run(name: str, onnx: bool, size: int | None = None) -> dict:
    start = time.perf_counter()
    row: dict = {"model": name}
    try:
        model, x = build(name, size)
        with tempfile.TemporaryDirectory() as tmp:
            row.update(readme_flow(model, x, Path(tmp), onnx=onnx))
        saving = row.get("mac_saving", 1 - 1 / row.get("param_ratio", 1.0))
        row["pruned"] = saving >= 0.25 and row.get("parity_ok", True)
        if not row["pruned"]:
            why = row.get("left_alone_reason")
            row["reason"] = ((f"loses only {saving:.0%} of its MACs" + (f"; the rest is left whole: {why}" if why else ""))
                             if saving < 0.25 else "ONNX parity failed")
    except sa.StructADMMError as exc:
        row.update(pruned=False, reason=(str(exc).splitlines() or [type(exc).__name__])[0])
    except Exception as exc:  # a bug of ours: keep the run going, record it
        row.update(pruned=False, reason=f"internal error: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                   traceback=traceback.format_exc(limit=3))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*",
                        default=[f"timm:{m}" for m in TIMM_CNNS + TIMM_TRANSFORMERS]
                        + [f"torchvision:{m}" for m in TORCHVISION_CNNS + TORCHVISION_TRANSFORMERS]
                        + [f"hf:{m}" for m in HF_ENCODERS])
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--tag", default="")
    parser.add_argument("--size", type=int, default=None, help="input height and width instead of each model's default")
    args = parser.parse_args()
    rows = []
    for name in args.models:
        row = run(name, onnx=not args.no_onnx, size=args.size)
        rows.append(row)
        status = "pruned" if row["pruned"] else f"NOT pruned: {row.get('reason')}"
        print(f"{name:40s} {row.get('mac_ratio', row.get('param_ratio', 0)):6.2f}x  {row['seconds']:6.1f}s  {status}",
              flush=True)
        write(rows, RESULTS / f"model_zoos{args.tag}", " ".join(sys.argv))  # after every model: a long run keeps its rows
    done = sum(r["pruned"] for r in rows)
    print(f"{done}/{len(rows)} pruned ({done / len(rows):.0%})")


def write(rows: list[dict], stem: Path, command: str) -> None:
    done = sum(r["pruned"] for r in rows)
    stem.parent.mkdir(exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    lines = [f"`{command}`", "",
             "Parity: the largest absolute difference between ONNX Runtime's output and the masked torch model's, "
             "and that difference relative to the largest output magnitude (the pass rule: relative ≤ 1e-3).", "",
             "| model | pruned | MAC ratio | parity, absolute | parity, relative | reason |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {'yes' if r['pruned'] else 'no'} | {r.get('mac_ratio', float('nan')):.2f} | "
                     f"{r.get('parity', float('nan')):.1e} | {r.get('parity_rel', float('nan')):.1e} | "
                     f"{r.get('reason', '')} |")
    lines.append(f"\n{done} of {len(rows)} pruned ({done / len(rows):.0%}).")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")

if __name__ == "__main__":
    main()
