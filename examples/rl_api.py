"""Reinforcement learning through the step-level API (issue 33): the client owns the loop, the
server owns the model. Four clients, each a thread with its own LoRA, run at once:

    sample n completions of each prompt of a batch (the server's sampling log-probs come along)
    -> score each with a verifiable reward (a format check, no judge model)
    -> advantages: each reward minus the mean of its prompt's group (GRPO, Shao et al. 2024,
       section 4.1.2, without the division by the group's std), on every completion token
    -> forward_backward with loss "importance_sampling" (weights 0 on the prompt), optim_step.

Because the clients run at once, the server fuses their calls: one batched generation for their
samples, one forward and backward for their gradients (service_loop.answer_steps). Start a server,
then run this against it:

    python serve.py --base_model checkpoints/smollm2-135m-instruct --out_dir out/serve --api_nice 0
    python examples/rl_api.py --out_dir out/serve [--url http://127.0.0.1:8000] [--iterations 12] [--n 4]

It prints each client's mean reward at every iteration. `run_clients` is the loop without the
tokenizer or the command line (tests/test_rl_api.py drives it on a tiny model).
"""
import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import stepclient  # noqa: E402

Reward = Callable[[dict], float]   # a completion {"tokens", "logprobs", "stop_reason"} -> its reward


class Task(NamedTuple):
    """What one client learns: its prompts (token ids) and the reward of a completion."""
    name: str
    prompts: list[list[int]]
    reward: Reward


def group_advantages(rewards: list[float]) -> list[float]:
    """Each reward minus the group's mean: the completions of one prompt are each other's baseline."""
    mean = sum(rewards) / len(rewards)
    return [r - mean for r in rewards]


def rl_datum(prompt: list[int], completion: dict, advantage: float, weight: float) -> dict:
    """The prompt and its completion as one datum of the importance_sampling loss. Position t
    predicts targets[t], so the first len(prompt) - 1 positions predict prompt tokens: weight 0
    there (their logprobs and advantages are placeholders); each completion token gets `weight`,
    its sampling-time log-prob and the completion's advantage."""
    tokens, k, n = prompt + completion["tokens"], len(prompt) - 1, len(completion["tokens"])
    return {"tokens": tokens[:-1], "targets": tokens[1:], "weights": [0.0] * k + [weight] * n,
            "logprobs": [0.0] * k + completion["logprobs"], "advantages": [0.0] * k + [advantage] * n}


def rl_iteration(lora: stepclient.TrainingClient, prompts: list[list[int]], reward: Reward, *, n: int,
                 max_tokens: int, stop: list, seed: int, adam: dict) -> float:
    """One iteration of one client: sample, score, step. Groups whose completions all score the
    same carry no signal (advantages 0) and are left out; each completion token weighs
    1 / (completions sampled), so a step's size does not depend on how many groups were kept.
    Returns the mean reward of the sampled completions."""
    samples = [lora.sample(p, n=n, temperature=1.0, max_tokens=max_tokens, stop=stop, seed=seed + i)
               for i, p in enumerate(prompts)]
    scored = []
    for prompt, future in zip(prompts, samples):
        completions = future.result()["completions"]
        scored.append((prompt, completions, [reward(c) for c in completions]))
    weight = 1.0 / (n * len(prompts))
    batch = [rl_datum(prompt, c, a, weight) for prompt, completions, rewards in scored
             for c, a in zip(completions, group_advantages(rewards)) if a != 0]
    if batch:   # forward_backward and optim_step queued together: they run in order on the server
        lora.forward_backward(batch, "importance_sampling")
        lora.optim_step(**adam).result()
    return sum(sum(rewards) for *_, rewards in scored) / (n * len(prompts))


def run_client(lora: stepclient.TrainingClient, task: Task, curve: list[float], *, iterations: int, batch: int,
               n: int, max_tokens: int, stop: list, seed: int, adam: dict, log: Callable[[str], None], label: str):
    """A client's loop: `iterations` iterations over its prompts in turn, `batch` at a time; each
    mean reward appended to curve."""
    for it in range(iterations):
        start = it * batch % len(task.prompts)
        prompts = [task.prompts[(start + j) % len(task.prompts)] for j in range(batch)]
        curve.append(rl_iteration(lora, prompts, task.reward, n=n, max_tokens=max_tokens, stop=stop,
                                  seed=seed + 1000 * it, adam=adam))
        log(f"iteration {it:3d}  {label}: mean reward {curve[-1]:.3f}")


def run_clients(service: stepclient.ServiceClient, tasks: list[Task], *, iterations: int, batch: int = 2, n: int = 4,
                max_tokens: int = 12, stop: list = (), seed: int = 0, lora_config: dict | None = None,
                adam: dict | None = None, log: Callable[[str], None] | None = None) -> list[list[float]]:
    """One LoRA per task on the server, each trained by its own thread at the same time; returns
    each client's mean reward per iteration. log: each iteration's line (default: printed)."""
    config = lora_config or {"r": 8, "alpha": 16, "targets": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    loras = [service.create_lora(**config, seed=seed + i) for i in range(len(tasks))]
    curves = [[] for _ in tasks]
    errors, lock = [], threading.Lock()

    def printed(line: str):
        with lock:   # one line at a time from the clients' threads
            print(line, flush=True)

    def client(i: int):
        try:
            run_client(loras[i], tasks[i], curves[i], iterations=iterations, batch=batch, n=n, max_tokens=max_tokens,
                       stop=list(stop), seed=seed * 1_000_003 + 100_000 * i, adam=adam or {"lr": 2e-3}, log=log or printed,
                       label=f"client {i} ({tasks[i].name}, {loras[i].lora_id})")
        except Exception as e:   # noqa: BLE001 - raised again below, in the caller's thread
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return curves


# ----------------------------------------------------------------------------- the demo's rewards (text)

def brief(text: str, finished: bool) -> float:
    """1 if the answer ended (its stop token) within at most 8 words."""
    return float(finished and len(text.split()) <= 8)


def opens_the(text: str, finished: bool) -> float:
    """1 if the answer opens with "The " (the base does in about a fifth of its answers)."""
    return float(text.startswith("The "))


TEXT_REWARDS = {"brief": brief, "opens_the": opens_the}   # --rewards names them, one per client


def demo_tasks(tokenizer, rewards: list[str]) -> list[Task]:
    """The demo's questions (demo/*.json instructions) through the chat template, one Task per reward."""
    import generate
    questions = [row["instruction"] for name in ("french", "json", "signoff")
                 for row in json.loads((ROOT / "demo" / f"{name}.json").read_text())]
    prompts = [generate.encode_prompt(tokenizer, q, "chat") for q in dict.fromkeys(questions)]

    def scored(check):
        return lambda c: check(tokenizer.decode(c["tokens"], skip_special=True).strip(), c["stop_reason"] == "stop")
    return [Task(name, prompts, scored(TEXT_REWARDS[name])) for name in rewards]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="the server (default $SERVE_URL, else http://127.0.0.1:8000)")
    p.add_argument("--out_dir", default="out/serve", help="the server's out_dir: its token (unless $SERVE_TOKEN)")
    p.add_argument("--base_model", default=str(ROOT / "checkpoints/smollm2-135m-instruct"), help="its tokenizer")
    p.add_argument("--rewards", default="brief,opens_the,brief,opens_the", help=f"one per client, of {', '.join(TEXT_REWARDS)}")
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--batch", type=int, default=2, help="prompts per iteration")
    p.add_argument("--n", type=int, default=4, help="completions per prompt (its group)")
    p.add_argument("--max_tokens", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import data
    tokenizer = data.load_tokenizer(args.base_model)
    tasks = demo_tasks(tokenizer, args.rewards.split(","))
    service = stepclient.ServiceClient(args.url, out_dir=args.out_dir)
    t0 = time.time()
    curves = run_clients(service, tasks, iterations=args.iterations, batch=args.batch, n=args.n, max_tokens=args.max_tokens,
                         stop=sorted(tokenizer.eos_ids), seed=args.seed, adam={"lr": args.lr})
    third = max(1, args.iterations // 3)
    for i, (task, curve) in enumerate(zip(tasks, curves)):
        print(f"client {i} ({task.name}): mean reward, first {third} iterations {sum(curve[:third]) / third:.3f}, "
              f"last {third} {sum(curve[-third:]) / third:.3f}")
    print(f"{args.iterations} iterations of {len(tasks)} clients in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
