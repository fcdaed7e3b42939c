"""Benchmark: one Stage-2 training step per packaged LLM, and the LM head at the targets vs `logits_to_keep`.

    python -m bench.stage2_llms                      # every packaged LLM installed, 3 timed rounds
    python -m bench.stage2_llms --llms packaged:SmolLM2-135M-Instruct packaged:gemma-3-270m --rounds 5

All models in ONE process (Qwen2.5-Coder-1.5B's step alone needs ~10 GiB: leave it out on a shared
machine, `--llms`), in bf16 (the CPU default on AMX machines), `--threads` torch threads (default 1:
on a contended 2-core machine two threads can be several times slower than one, ../shared/MODELS.md).
A step is A-LLMRec's Stage-2 step: batch 4 of the shipped ML-100K prompt layout (user token, 10 history and
20 candidate titles from ML-100K's item file, each with an item soft token before its title, titles cut to
12 tokens, the target title + eos), a fresh projector (64-d user and item vectors -> the LLM's width), the
LLM frozen, forward + backward into the projector. Titles and vectors are seeded random picks (a step's
time does not depend on which titles they are). Each round runs, for every model in turn, one step of:

TARGETS: `stage2_loss` (the hidden states gathered at the answer positions, then the LM head);
KEEP:    the previous loss, `model(..., logits_to_keep=n+1)` then the last n+1 logits (in bf16 on CPU the
         kept slice is not contiguous and the head's weight is copied every call, MODELS.md trap 1).

One untimed warm-up step per model and path; the order of models and of the two paths alternates between
rounds, so a change of machine load hits all alike. Reported: the median over rounds, ratios measured in
this run (to SmolLM2-135M, and KEEP / TARGETS), the load average before and after, peak RSS of the process.
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import loadavg, machine, table, write_results

LLMS = ["packaged:SmolLM2-135M-Instruct", "packaged:gemma-3-270m", "packaged:Qwen2.5-Coder-1.5B-Instruct"]
BATCH, HISTORY, CANDIDATES, TITLE_TOKENS, CF_DIM = 4, 10, 20, 12, 64


def ml100k_titles() -> list[str]:
    spec = importlib.util.find_spec("recbole")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_example" / "ml-100k" / "ml-100k.item"
    rows = [line.split("\t") for line in path.read_text(encoding="latin-1").splitlines()[1:]]
    return [f"{r[1]} ({r[2]})" if len(r) > 2 and r[2] else r[1] for r in rows]


def installed(name: str) -> bool:
    from allmrec.llm import loading
    short = name.split(":", 1)[1]
    try:
        if short in loading.SPLIT_LLMS:
            loading.split_parts(loading.SPLIT_LLMS[short])
        else:
            loading.packaged_gguf(short)
    except (FileNotFoundError, ValueError):
        return False
    return True


def keep_loss(llm, proj, batch, user, items, ph):
    """The loss as computed before (logits_to_keep on the model's forward)."""
    import torch.nn.functional as F

    from allmrec.llm.prompt import IGNORE, positions_from_mask
    from allmrec.llm.stage2 import soft_prompt_embeds
    mask, labels = batch["attention_mask"], batch["labels"]
    n = int((labels != IGNORE).sum(1).max())
    embeds = soft_prompt_embeds(llm, proj, batch["input_ids"], ph, user, items)
    logits = llm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions_from_mask(mask),
                 logits_to_keep=n + 1).logits[:, -(n + 1):-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -n:].reshape(-1), ignore_index=IGNORE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--llms", nargs="+", default=None, help="default: every packaged LLM installed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import psutil
    import torch

    from allmrec.config import DomainConfig
    from allmrec.llm.loading import load_llm
    from allmrec.llm.prompt import PromptBuilder
    from allmrec.llm.stage2 import Stage2Projector, stage2_loss

    torch.set_num_threads(a.threads)
    names = a.llms or [n for n in LLMS if installed(n)]
    titles = ml100k_titles()
    rng = np.random.default_rng(0)
    picks = [rng.choice(len(titles), HISTORY + CANDIDATES, replace=False) for _ in range(BATCH)]
    domain = DomainConfig("watched", "movie", "movies")
    load_before = loadavg()
    setups, info = {}, []
    for name in names:
        t0 = time.perf_counter()
        llm, tok = load_llm(name, dtype=torch.bfloat16)
        load_s = time.perf_counter() - t0
        pb = PromptBuilder(tok, domain, TITLE_TOKENS, item_position="before")
        encs = [pb.build([titles[i] for i in p[:HISTORY]], [titles[i] for i in p[HISTORY:]], titles[p[HISTORY]])
                for p in picks]
        batch = pb.collate(encs)
        torch.manual_seed(0)
        H = llm.config.hidden_size
        proj = Stage2Projector(CF_DIM, CF_DIM, H)
        user = torch.randn(BATCH, CF_DIM)
        items = torch.randn(BATCH, HISTORY + CANDIDATES, CF_DIM)
        setups[name] = (llm, proj, batch, user, items, pb.placeholders)
        n_params = sum(p.numel() for p in llm.parameters())
        info.append({"llm": name, "params_M": round(n_params / 1e6, 1), "vocab": llm.get_output_embeddings().weight.shape[0],
                     "hidden": H, "prompt_tokens": int(batch["input_ids"].shape[1]), "load_s": round(load_s, 1)})
        print(f"loaded {name} in {load_s:.1f} s, prompt {batch['input_ids'].shape[1]} tokens", flush=True)

    def step(name: str, path: str) -> tuple[float, float]:
        llm, proj, batch, user, items, ph = setups[name]
        proj.zero_grad()
        t0 = time.perf_counter()
        if path == "targets":
            loss = stage2_loss(llm, proj, batch, user, items, ph)
        else:
            loss = keep_loss(llm, proj, batch, user, items, ph)
        loss.backward()
        return time.perf_counter() - t0, loss.detach().item()

    losses = {}
    for name in names:  # warm-up, and the two losses must agree
        losses[name] = {p: step(name, p)[1] for p in ("targets", "keep")}
        print(f"warm-up {name}: loss targets {losses[name]['targets']:.4f}, keep {losses[name]['keep']:.4f}", flush=True)
    times = {(n, p): [] for n in names for p in ("targets", "keep")}
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]
        paths = ("targets", "keep") if r % 2 == 0 else ("keep", "targets")
        for name in order:
            for p in paths:
                times[(name, p)].append(step(name, p)[0])
                print(f"  {name} {p}: {times[(name, p)][-1]:.2f} s, load {loadavg()}", flush=True)
        print(f"round {r + 1}/{a.rounds} done, load {loadavg()}", flush=True)
    load_after = loadavg()

    base = statistics.median(times[(names[0], "targets")])
    rows = []
    for i, name in enumerate(names):
        t, k = statistics.median(times[(name, "targets")]), statistics.median(times[(name, "keep")])
        rows.append({**info[i], "targets_s": round(t, 2), "keep_s": round(k, 2), "keep/targets": round(k / t, 2),
                     f"targets vs {names[0].split(':')[-1]}": round(t / base, 2),
                     "loss_targets": round(losses[name]["targets"], 4), "loss_keep": round(losses[name]["keep"], 4),
                     "all_targets_s": [round(x, 2) for x in times[(name, "targets")]],
                     "all_keep_s": [round(x, 2) for x in times[(name, "keep")]]})
    peak = psutil.Process().memory_info().rss  # current; ru_maxrss below is the peak
    import resource
    result = {"machine": machine(), "threads": a.threads, "rounds": a.rounds, "dtype": "bfloat16",
              "batch": BATCH, "loadavg_before": load_before, "loadavg_after": load_after,
              "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
              "rss_end_gib": round(peak / 2 ** 30, 2), "rows": rows}
    path = write_results("stage2_llms", result)
    cols = ["llm", "params_M", "vocab", "prompt_tokens", "targets_s", "keep_s", "keep/targets",
            f"targets vs {names[0].split(':')[-1]}", "loss_targets", "loss_keep"]
    print(table(rows, cols))
    print(f"load average before {load_before}, after {load_after}; peak RSS {result['peak_rss_gib']} GiB; {path}")


if __name__ == "__main__":
    main()
