"""Training options that change how a step runs but not what it computes: activation
checkpointing and early stopping."""

import json

import torch
from launcher import DATA_ARGS, TRAIN, check, python

from moe_dist import MoEConfig, MoEForCausalLM


def _loss_and_grads(grad_ckpt: bool):
    torch.manual_seed(0)
    config = MoEConfig.from_preset(
        "tiny-moe", vocab_size=256, num_hidden_layers=2, router_jitter_noise=0.1, router_bias_update_rate=1e-3
    )
    model = MoEForCausalLM(config).train()
    if grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same jitter draws in both runs
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    loads = [r.load_sum.clone() for r in model.routers()]
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, loads


def test_activation_checkpointing_gives_the_same_loss_gradients_and_router_loads():
    loss, grads, loads = _loss_and_grads(grad_ckpt=False)
    ckpt_loss, ckpt_grads, ckpt_loads = _loss_and_grads(grad_ckpt=True)
    assert ckpt_loss == loss
    assert grads.keys() == ckpt_grads.keys()
    assert all(torch.allclose(grads[n], ckpt_grads[n], atol=1e-7) for n in grads)
    # Recomputation re-runs the routers; the loads they count for the bias update must not double.
    assert all(torch.equal(a, b) for a, b in zip(loads, ckpt_loads)) and sum(int(x.sum()) for x in loads) > 0


def test_early_stopping_ends_the_run_after_patience_evals_without_a_new_best(tmp_path):
    run = tmp_path / "run"
    # lr 0: the weights never change, so the second eval cannot beat the first.
    proc = check(
        python(
            TRAIN,
            [
                "--model",
                "tiny-moe",
                *DATA_ARGS,
                "--max_steps",
                "40",
                "--eval_every",
                "3",
                "--lr",
                "0",
                "--warmup_steps",
                "0",
                "--early_stopping_patience",
                "1",
                "--output_dir",
                str(run),
            ],
        )
    )
    assert "early stopping at step 6: no improvement for 1 evals" in proc.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["best_step"] == 3
    assert (run / "hf" / "model.safetensors").is_file()
