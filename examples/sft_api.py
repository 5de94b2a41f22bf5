"""Supervised fine-tuning through the step-level API (issue 33): this script owns the training
loop, the server (serve.py) owns the model. It trains one SFT job of a train.py config and saves
its LoRA on the server, the same adapter `python train.py CONFIG` gives that job (to float
reassociation: tests/test_sft_api.py):

    python serve.py --base_model checkpoints/smollm2-135m-instruct --out_dir out/serve
    python examples/sft_api.py [--config demo/config.json] [--job json] [--out_dir out/serve] [--url URL]

What makes it the same, each piece taken from the repo rather than written again:
  - the LoRA: the job's r, alpha, dropout, targets, variant, with train.py's initial weights
    (create_lora's init_as: the init depends on the adapter's name, lora.adapter_seed);
  - the rows and their order: the job's data read as train.py reads it (jobs.prepare) and its
    plan (scheduler.JobPlan: the shuffled order per epoch, cut into optimizer steps and those
    into micro-batches), one forward_backward per micro-batch, one optim_step per step;
  - the loss: train.py's SFT loss of a step is its summed token NLL / its loss tokens
    (objectives.SFT.loss), so each labelled token weighs 1 / the step's loss tokens, every
    other position 0 (the API's cross_entropy is -sum(weights * logp));
  - the optimizer: AdamW as jobs.make_optimizer builds it (torch's betas (0.9, 0.999) and eps
    1e-8, the job's weight_decay: the API's defaults differ, so they are passed), the job's
    max_grad_norm as grad_clip_norm (clipped before the step, as train.optimizer_step), and the
    lr of each step from the job's schedule (train.get_lr).
What differs: no held-out evaluation (the API has no forward without gradients), so no early
stopping either: this saves the LAST weights, where train.py saves the best held-out ones of a
job with early_stop (it says so). With dropout the masks are train.py's too: init_as gives the
LoRA the job's dropout stream (tested with packed batches, the default of both). Refused: other
objectives, optimizers and LoRA+ (the API has plain AdamW).
The client needs the base folder (its tokenizer, to read the data) and the config's data files.
"""
import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the repo's modules, run from anywhere

import data        # noqa: E402
import demo        # noqa: E402
import jobs        # noqa: E402
import stepclient  # noqa: E402
import train       # noqa: E402
from config import JobConfig, RunConfig   # noqa: E402


def job_of(cfg: RunConfig, name: str) -> tuple[RunConfig, JobConfig]:
    """The config with only that job (its plan depends on the run's seed and its name alone),
    and the job; ValueError when it is missing or not something the API trains as train.py does."""
    job = next((j for j in cfg.jobs if j.name == name), None)
    if job is None:
        raise ValueError(f"no job {name!r} in the config (jobs: {', '.join(j.name for j in cfg.jobs)})")
    unlike = {"objective": job.objective != "sft", "optimizer": job.optimizer != "adamw",
              "loraplus_lr_ratio": job.loraplus_lr_ratio is not None}
    if any(unlike.values()):
        raise ValueError(f"job {name!r}: {', '.join(k for k, v in unlike.items() if v)}: the API trains SFT with plain AdamW")
    if job.early_stop is not None:
        print(f"note: job {name!r} has early_stop: train.py saves its best held-out adapter, this the last")
    return dataclasses.replace(cfg, jobs=[job]), job


def lora_fields(cfg: RunConfig, job: JobConfig, targets: list[str]) -> dict:
    """create_lora's fields for the job's adapter, initialised as train.py initialises it."""
    lora_cfg = job.lora_config()
    variant = lora_cfg.resolved_variant   # use_dora, init pissa | olora: as the API spells them
    init = lora_cfg.init if lora_cfg.init in ("kaiming", "gaussian") else "kaiming"
    return dict(r=job.r, alpha=job.alpha, dropout=job.dropout, targets=targets, variant=variant, init=init,
                use_rslora=job.use_rslora, seed=cfg.seed, init_as=job.name)


def datums(examples: list[data.Example], step_loss_tokens: int) -> list[dict]:
    """The micro-batch's examples as the API's datums: position t predicts token t + 1
    (data.Example's labels are aligned with the input, the API's targets shifted by one), each
    labelled token weighing 1 / its optimizer step's loss tokens, the prompt 0."""
    weight = 1.0 / max(step_loss_tokens, 1)
    out = []
    for example in examples:
        labels, following = example.labels[1:], example.input_ids[1:]
        out.append({"tokens": example.input_ids[:-1],
                    "targets": [t if label == data.IGNORE_INDEX else label for label, t in zip(labels, following)],
                    "weights": [0.0 if label == data.IGNORE_INDEX else weight for label in labels]})
    return out


def adam(job: JobConfig, lr: float) -> dict:
    """optim_step's settings: torch.optim.AdamW's defaults as jobs.make_optimizer uses them."""
    return dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=job.weight_decay,
                grad_clip_norm=job.max_grad_norm or 0.0)


def train_job(service: stepclient.ServiceClient, cfg: RunConfig, name: str) -> stepclient.TrainingClient:
    """Train the config's job `name` through the API, step by step as train.py would; returns its LoRA."""
    cfg, job = job_of(cfg, name)
    targets = job.targets or list(jobs.check_base(cfg).DEFAULT_TARGETS)   # the base's facts, as train.py checks them
    _, train_sets, _, (plan,), _ = jobs.prepare(cfg)
    rows = train_sets[name]
    lora = service.create_lora(**lora_fields(cfg, job, targets))
    pending = []
    while not plan.done:
        mb = plan.pop()
        pending.append(lora.forward_backward(datums([rows[i] for i in mb.indices], mb.step_loss_tokens)))
        if mb.last_in_step:   # the accumulation ends: one optimizer step at the job's scheduled lr
            loss = sum(f.result()["loss"] for f in pending)   # a refused call raises here, before the step
            lr = train.get_lr(mb.step, plan.total_steps, job)
            lora.optim_step(adam(job, lr)).result()
            print(f"step {mb.step + 1}/{plan.total_steps}: loss {loss:.4f}, lr {lr:.3g}")
            pending = []
    return lora


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="demo/config.json", help="a train.py config")
    parser.add_argument("--job", default="json", help="the job to train (an SFT job)")
    parser.add_argument("--url", default=None, help="the server (default $SERVE_URL, else http://127.0.0.1:8000)")
    parser.add_argument("--out_dir", default="out/serve", help="the server's out_dir: its token, and where it saves")
    parser.add_argument("--save_as", default=None, help="the saved LoRA's name (default: the job's)")
    args = parser.parse_args(argv)
    service = stepclient.ServiceClient(args.url, out_dir=args.out_dir)
    t0 = time.time()
    lora = train_job(service, demo.load_config_file(args.config, []), args.job)
    lora.save(args.save_as or args.job).result()
    print(f"saved {Path(args.out_dir) / '_api' / (args.save_as or args.job)} in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
