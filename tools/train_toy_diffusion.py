"""Train the embedded toy diffusion model: a small class-conditional diffusers UNet2DModel on
fresh renders of toy scenes (3x32x32 pixels in [-1, 1], SD1.5's schedule, epsilon prediction,
label dropout to a null class for classifier-free guidance, EMA weights).

    python tools/train_toy_diffusion.py                      # writes data/toy_unet/ (pipeline directory)
    python tools/train_toy_diffusion.py --steps 20 --batch-size 8 --channels 8 16 --norm-groups 4 --head-dim 8 --out /tmp/toy_unet   # smoke run

Classes: the first --train-prompts prompts of the toy train split, then the first
--heldout-prompts of the held-out split; the null class is id C (the last class embedding).
Writes ``<out>/unet``, ``<out>/scheduler``, ``<out>/model_index.json`` (with ``id2label``) and
``<out>/train_metrics.json`` (timing and losses). ``--checkpoint-every N`` rewrites ``<out>``
with the EMA weights every N steps, so an interrupted run leaves a model.

Then (unless ``--no-eval``) it scores samples of every class with the toy segmentation reward
(``consolver.toy_diffusion.quality``) and writes ``quality.json``, ``samples.png`` and the model
card ``README.md``. ``--eval-only`` does just that for an existing directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from consolver.toy_diffusion.model import (DEFAULT_MODEL_DIR, ToyUNetSpec, default_class_prompts, load_pipeline,
                                           save_pipeline)
from consolver.toy_diffusion.training import TrainConfig, train


def parse_args(argv=None) -> argparse.Namespace:
    d_spec, d_cfg = ToyUNetSpec(), TrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(DEFAULT_MODEL_DIR), help="pipeline directory to write")
    parser.add_argument("--train-prompts", type=int, default=12, help="classes from the toy train split")
    parser.add_argument("--heldout-prompts", type=int, default=4, help="classes from the toy held-out split")
    parser.add_argument("--channels", type=int, nargs="+", default=list(d_spec.block_out_channels),
                        help="block_out_channels, one per resolution level")
    parser.add_argument("--attention", type=int, nargs="+", default=None,
                        help="1/0 per level: self-attention in that level's blocks (default: the last two levels)")
    parser.add_argument("--layers-per-block", type=int, default=d_spec.layers_per_block)
    parser.add_argument("--norm-groups", type=int, default=d_spec.norm_num_groups)
    parser.add_argument("--head-dim", type=int, default=d_spec.attention_head_dim, help="attention head dimension")
    parser.add_argument("--steps", type=int, default=d_cfg.steps)
    parser.add_argument("--batch-size", type=int, default=d_cfg.batch_size)
    parser.add_argument("--lr", type=float, default=d_cfg.lr)
    parser.add_argument("--warmup-steps", type=int, default=d_cfg.warmup_steps)
    parser.add_argument("--ema-decay", type=float, default=d_cfg.ema_decay)
    parser.add_argument("--label-dropout", type=float, default=d_cfg.label_dropout)
    parser.add_argument("--snr-gamma", type=float, default=d_cfg.snr_gamma, help="Min-SNR gamma; 0 = plain MSE")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="wall-clock budget: the LR anneals by time as well and the run stops at it")
    parser.add_argument("--seed", type=int, default=d_cfg.seed)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core machine)")
    parser.add_argument("--checkpoint-every", type=int, default=0, help="rewrite --out with the EMA weights every N steps")
    evaluation = parser.add_argument_group("evaluation (quality.json, samples.png, README.md)")
    evaluation.add_argument("--no-eval", action="store_true", help="skip the evaluation and the model card")
    evaluation.add_argument("--eval-only", action="store_true", help="evaluate the existing --out directory")
    evaluation.add_argument("--eval-samples", type=int, default=16, help="samples per class")
    evaluation.add_argument("--eval-steps", type=int, default=25, help="sampler steps")
    evaluation.add_argument("--eval-sampler", default="dpmsolver++", choices=("dpmsolver++", "ddim"))
    evaluation.add_argument("--eval-guidance", type=float, default=2.0, help="classifier-free guidance scale")
    return parser.parse_args(argv)


def evaluate(out: Path, args: argparse.Namespace) -> dict:
    """Score the pipeline in ``out`` and write quality.json, samples.png and README.md."""
    from consolver.rewards.toy import ToySegReward
    from consolver.toy_diffusion.card import write_model_card
    from consolver.toy_diffusion.quality import evaluate_classes

    train_file = out / "train_metrics.json"
    if not train_file.is_file():
        raise SystemExit(f"{train_file} not found: --eval-only needs a directory written by this tool")
    unet, scheduler, prompts = load_pipeline(out)
    bar = tqdm(total=(len(prompts) + 1) * args.eval_samples, desc="samples", unit="img")
    quality = evaluate_classes(unet, scheduler.config, prompts, ToySegReward(), args.eval_samples, args.eval_steps,
                               args.eval_guidance, args.eval_sampler, seed=args.seed,
                               progress=lambda done, total: bar.update(done - bar.n))
    bar.close()
    summary = {k: quality[k] for k in ("settings", "mean", "classes")}
    (out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out, json.loads(train_file.read_text()), quality)
    print(json.dumps(quality["mean"], indent=2))
    return summary


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if args.eval_only:
        return evaluate(Path(args.out), args)
    levels = len(args.channels)
    attention = args.attention if args.attention is not None else [int(i >= levels - 2) for i in range(levels)]
    spec = ToyUNetSpec(block_out_channels=tuple(args.channels), attention=tuple(bool(a) for a in attention),
                       layers_per_block=args.layers_per_block, norm_num_groups=args.norm_groups,
                       attention_head_dim=args.head_dim)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                         ema_decay=args.ema_decay, label_dropout=args.label_dropout,
                         snr_gamma=args.snr_gamma or None, seed=args.seed,
                         max_seconds=None if args.max_minutes is None else 60 * args.max_minutes)
    prompts = default_class_prompts(args.train_prompts, args.heldout_prompts)
    bar = tqdm(total=args.steps, desc="toy diffusion", unit="step")

    def on_step(step: int, metrics: dict) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", mse=f"{metrics['mse']:.4f}", lr=f"{metrics['lr']:.2e}")

    def on_checkpoint(step: int, ema_unet) -> None:
        save_pipeline(ema_unet, prompts, args.out)
        bar.write(f"checkpoint: step {step}, EMA weights -> {args.out}")

    result = train(spec, config, prompts, on_step=on_step, on_checkpoint=on_checkpoint,
                   checkpoint_every=args.checkpoint_every)
    bar.close()
    out = save_pipeline(result.unet, prompts, args.out)
    mses = result.mses
    metrics = {"spec": spec.to_dict(), "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
               "threads": args.threads, "num_parameters": result.num_parameters, "steps_done": result.steps,
               "train_seconds": round(result.seconds, 1), "final_mse_last200": round(result.final_mse(), 5),
               "mse_by_tenth": [round(sum(c) / len(c), 5) for c in _chunks(mses, 10)],
               "classes": {str(i): p for i, p in enumerate(prompts)},
               "command": shlex.join(["python", "tools/train_toy_diffusion.py",
                                      *(sys.argv[1:] if argv is None else argv)])}
    (out / "train_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(json.dumps({k: metrics[k] for k in ("num_parameters", "steps_done", "train_seconds", "final_mse_last200")}))
    if not args.no_eval:
        metrics["quality"] = evaluate(out, args)
    return metrics


def _chunks(values: list, n: int) -> list:
    size = max(1, len(values) // n)
    return [values[i:i + size] for i in range(0, len(values), size)][:n] if values else []


if __name__ == "__main__":
    main()
