"""Routing drift: on a fixed probe, the share of tokens per MoE layer whose top-k expert set the router now
chooses differently from step 0.

Fine-tuning on narrow data can move a released model's routing far from what it learnt, which is why people ask to
freeze the router. The probe is what each router saw at step 0 for the first validation row (cut to
`PROBE_TOKENS`, its real tokens only): those inputs are kept, and at every eval each router routes them again.
The metric therefore isolates the routers themselves: a frozen router (weights and selection bias) drifts by
exactly 0, however the layers before it train. Measuring it runs no model forward and no collective; capturing the
probe runs one forward of one row, the same on every rank (expert-parallel all-to-alls stay matched). The probe and
step 0's choices are written once to `RUN/routing_probe.pt`, so a resumed run still compares with step 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic_io import write_atomic
from .data import batch_tensors

PROBE_TOKENS = 128
PROBE_FILE = "routing_probe.pt"


@torch.no_grad()
def capture_probe(model, blocks: np.ndarray, device: torch.device, autocast) -> dict[int, torch.Tensor]:
    """Each router's input for the real tokens of the first row of `blocks` (in the dtype the router saw, on the
    CPU), by layer."""
    input_ids, _, *packed = (t[:, :PROBE_TOKENS].to(device) for t in batch_tensors(blocks, np.arange(1)))
    kwargs = dict(zip(("position_ids", "real_tokens"), packed))
    real = kwargs.get("real_tokens", torch.ones_like(input_ids, dtype=torch.bool)).reshape(-1)
    seen: dict[int, torch.Tensor] = {}
    hooks = [
        router.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.layer_idx, args[0][real].cpu()))
        for router in model.routers()
    ]
    was_training = model.training
    model.eval()
    try:
        with autocast():
            model(input_ids=input_ids, use_cache=False, **kwargs)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return seen


@torch.no_grad()
def choices(model, probe: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Each router's sorted top-k expert ids for its probe inputs, as it routes now (eval: no jitter)."""
    out = {}
    for router in model.routers():
        stats, was_training = router.stats, router.training
        router.eval()
        x = probe[router.layer_idx].to(router.weight.device)
        out[router.layer_idx] = router(x).expert_idx_TK.sort(dim=-1).values.cpu()
        router.stats = stats  # the eval's own routing statistics stay what the validation pass recorded
        router.train(was_training)
    return out


class RoutingDrift:
    """Step 0's choices on the probe, and each eval's share of probe tokens per layer that chose otherwise."""

    def __init__(self, run_dir: Path, threshold: float):
        self.path, self.threshold = Path(run_dir) / PROBE_FILE, threshold
        self.probe: dict[int, torch.Tensor] | None = None
        self.reference: dict[int, torch.Tensor] = {}
        self.warned: set[int] = set()

    def start(self, model, blocks: np.ndarray, engine, fresh: bool) -> None:
        """Capture the probe and step 0's choices (a fresh run; rank 0 writes them), or read them (a resume).

        Every rank takes the same branch (rank 0's view of the file, broadcast): a capture is a forward with
        expert-parallel collectives in it. A run resumed without the file compares with its resumed step.
        """
        if not fresh and engine.broadcast_int(int(self.path.is_file())):
            saved = torch.load(self.path, weights_only=True)
            self.probe, self.reference = saved["inputs"], saved["choices"]
            return
        self.probe = capture_probe(model, blocks, engine.device, engine.eval_context)
        self.reference = choices(model, self.probe)
        if engine.is_main:
            saved = {"inputs": self.probe, "choices": self.reference}
            write_atomic(self.path, lambda f: torch.save(saved, f))

    def measure(self, model) -> dict[str, float]:
        """Per layer, the share of probe tokens whose expert set differs from step 0's."""
        if self.probe is None:
            return {}
        now = choices(model, self.probe)
        return {
            f"routing_drift/{layer}": float((now[layer] != ref).any(dim=-1).float().mean()) if len(ref) else 0.0
            for layer, ref in self.reference.items()
        }

    def warnings(self, step: int, drift: dict[str, float]) -> list[str]:
        """One line per layer whose drift first passes the threshold (`--routing_drift_alert`)."""
        out = []
        for key, share in drift.items():
            layer = int(key.rsplit("/", 1)[1])
            if share > self.threshold and layer not in self.warned:
                self.warned.add(layer)
                out.append(
                    f"step {step}: layer {layer} routing drifted: {share:.1%} of the probe's tokens now choose other "
                    f"experts than at step 0 (alert above {self.threshold:.0%}); --freeze_router true keeps it"
                )
        return out
