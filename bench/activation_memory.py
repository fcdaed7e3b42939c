"""Measured per-token activation memory of a frozen LLM in Stage-2 (the figure docs/cluster.md scales to
OPT-6.7B): the bytes of every tensor autograd saves for the backward pass during one Stage-2 forward
(frozen LLM in eval mode, gradient needed only at the input embeddings, transformers' default attention),
counted exactly with `torch.autograd.graph.saved_tensors_hooks` (storages de-duplicated, the weights
themselves left out), at two prompt
lengths; reported per token, per layer and per hidden unit, i.e. the c in c*s*b*h bytes per layer.

    python -m bench.activation_memory [--llm packaged:SmolLM2-135M-Instruct] [--dtype bfloat16]
"""
from __future__ import annotations

import argparse
import json

import torch

from bench.common import machine, write_results


def saved_bytes(llm, embeds: torch.Tensor) -> int:
    seen: dict[int, int] = {}
    # frozen linear layers save their weight (dX = dY W): that is the parameter memory, not activations
    weights = {t.untyped_storage().data_ptr() for t in [*llm.parameters(), *llm.buffers()]}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in weights:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = llm(inputs_embeds=embeds, logits_to_keep=1)
    del out
    return sum(seen.values())


def main(argv: list[str] | None = None) -> dict:
    from allmrec.llm.loading import load_llm
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llm", default="packaged:SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", default="256,512")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    llm, _ = load_llm(args.llm, dtype=getattr(torch, args.dtype))
    c = llm.config
    h, L = c.hidden_size, c.num_hidden_layers
    rows = []
    for s in map(int, args.lengths.split(",")):
        x = (torch.randn(args.batch, s, h) * 0.02).to(llm.dtype).requires_grad_(True)
        n = saved_bytes(llm, x)
        rows.append({"seq": s, "batch": args.batch, "saved_bytes": n, "per_token_bytes": n / (s * args.batch),
                     "c_bytes_per_token_layer_hidden": n / (s * args.batch * L * h)})
    res = {"benchmark": "activation_memory", "machine": machine(), "llm": args.llm, "dtype": args.dtype,
           "hidden": h, "layers": L, "attn_implementation": getattr(c, "_attn_implementation", None), "rows": rows}
    for r in rows:
        print(f"s={r['seq']} b={r['batch']}: {r['saved_bytes'] / 2**20:.1f} MiB saved, "
              f"{r['per_token_bytes'] / 2**10:.1f} KiB/token, c = {r['c_bytes_per_token_layer_hidden']:.2f}")
    write_results("activation_memory", res)
    print(json.dumps({k: res[k] for k in ("llm", "dtype", "hidden", "layers", "attn_implementation")}))
    return res


if __name__ == "__main__":
    main()
