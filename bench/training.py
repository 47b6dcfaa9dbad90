"""Part 5, training: images/s of forward + backward + SGD step on CPU at batch 32.

``facegate.train.backbones.get_backbone`` (mobilefacenet, iresnet50) with a CosFace head
(``facegate.train.losses.CosFace``) over real aligned crops and random labels; one
warm-up step, then a few timed steps. The two backbones are each other's reference
(the recipe's speed/quality trade-off); GPU rows are pending: no GPU lent to this task.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.assets import real_crops
from bench.measure import summarise
from bench.report import fmt, table

SIZES = {
    "full": {"backbones": ["mobilefacenet", "iresnet50"], "batch": 32, "steps": 3,
             "classes": 1000, "budget_s": 120.0},
    "smoke": {"backbones": ["mobilefacenet"], "batch": 2, "steps": 1, "classes": 10,
              "budget_s": 30.0},
}


def train_steps(name: str, x, labels, classes: int, steps: int, budget_s: float) -> dict:
    import torch
    from facegate.train.backbones import count_parameters, get_backbone
    from facegate.train.losses import CosFace

    torch.manual_seed(0)
    model = get_backbone(name, embedding_size=512).train()
    head = CosFace(classes, 512)
    optimiser = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.01, momentum=0.9)

    def step() -> float:
        optimiser.zero_grad(set_to_none=True)
        loss = head(model(x), labels)
        loss.backward()
        optimiser.step()
        return float(loss.detach())

    step()  # warm-up: allocator and kernel selection
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    for _ in tqdm(range(steps), desc=f"train {name}", leave=False):
        if times and time.perf_counter() > deadline:
            break
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"backbone": name, "parameters": count_parameters(model), "steps": len(times),
            "images_per_s": x.shape[0] * len(times) / sum(times), "step": summarise(times),
            "last_loss": loss, "torch_threads": torch.get_num_threads()}


def run(sizes: dict, workdir: Path) -> dict:
    import torch

    crops, _ = real_crops(min(sizes["batch"], 64))
    reps = -(-sizes["batch"] // len(crops))
    batch = np.concatenate([crops] * reps)[: sizes["batch"]]
    x = torch.from_numpy(((batch.astype(np.float32) - 127.5) / 127.5).transpose(0, 3, 1, 2).copy())
    labels = torch.randint(0, sizes["classes"], (sizes["batch"],), generator=torch.Generator().manual_seed(0))
    rows = [train_steps(name, x, labels, sizes["classes"], sizes["steps"], sizes["budget_s"])
            for name in sizes["backbones"]]
    return {"batch": sizes["batch"], "classes": sizes["classes"], "rows": rows,
            "pending": {"CUDA (single GPU, AMP)": "pending: no GPU lent to this task"}}


def markdown(result: dict) -> str:
    text = (
        f"Forward + backward + SGD step, batch {result['batch']} of real aligned crops, CosFace "
        f"head over {result['classes']} classes, PyTorch CPU; one warm-up step, then the "
        "timed steps shown.\n\n"
    )
    rows = [[r["backbone"], f"{r['parameters'] / 1e6:.1f} M", r["steps"], r["images_per_s"],
             r["step"]["p50_ms"], r["torch_threads"]] for r in result["rows"]]
    text += table(["backbone", "parameters", "steps timed", "images/s", "ms/step p50",
                   "torch threads"], rows)
    text += "\n" + table(["GPU", "images/s"], [[k, v] for k, v in result["pending"].items()])
    by = {r["backbone"]: r for r in result["rows"]}
    if "mobilefacenet" in by and "iresnet50" in by:
        text += (f"\niresnet50 trains at {fmt(by['iresnet50']['images_per_s'] / by['mobilefacenet']['images_per_s'])}x "
                 "the images/s of mobilefacenet on this CPU.\n")
    return text
