"""LoRA on the LLM for the TALLRec baseline (Bao et al. 2023): the LLM itself is fine-tuned, cheaply.

TALLRec here is the LLM-Only prompt (no soft tokens) with low-rank adapters on some of the LLM's linear
layers, trained on Stage-2's next-title loss (`stage2_loss` with no projector). peft's
`inject_adapter_in_model` puts the adapters into the model in place, so the result is still the same
`*ForCausalLM` class: `get_input_embeddings`, `logits_to_keep`, the KV cache and ranking work unchanged.

Only the adapter weights are trainable and only they are saved (a few hundred KB, safetensors); the base
weights come back from the packaged LLM when loading. The adapters are kept in fp32 even on a bf16 LLM:
AdamW steps of size ~lr=1e-4 on bf16 weights would mostly round away.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

LORA_MARK = ".lora_"          # every adapter parameter's name contains this (lora_A / lora_B)
ADAPTER = "default"           # peft's adapter name; part of the parameter names, so fixed here


def linear_leaf_names(model: nn.Module) -> list[str]:
    """Last name component of every nn.Linear in `model` (what `target_modules` matches)."""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear) and n})


def default_target_modules(model: nn.Module) -> list[str]:
    """peft's per-architecture defaults (llama, opt, mistral: q_proj + v_proj; gpt2: c_attn; ...), else
    q_proj + v_proj, which Llama-, OPT-, Mistral- and Qwen-style attention all have."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
    kind = getattr(getattr(model, "config", None), "model_type", None)
    return list(DEFAULTS.get(kind, ["q_proj", "v_proj"]))


def _check_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {targets!r}")
    names = {n for n, _ in model.named_modules()}
    leaves = {n.rsplit(".", 1)[-1] for n in names}
    missing = [t for t in targets if t not in leaves and not any(n.endswith("." + t) for n in names)]
    if len(missing) == len(targets):
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in "
                         f"{type(model).__name__}; its linear layers are {linear_leaf_names(model)}")
    return list(targets)


def add_lora(llm: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.05,
             target_modules: Sequence[str] | None = None) -> nn.Module:
    """Inject LoRA adapters (rank `r`, scaling alpha / r) into `llm` in place and return it.

    Afterwards exactly the adapter weights require grad (fp32, B = 0 so the model's output is unchanged
    until it trains); every base weight is frozen. `target_modules` None or empty: the architecture's
    default (`default_target_modules`). A ValueError names the model's linear layers when none of the
    targets exist.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    if r < 1 or alpha <= 0 or not 0 <= dropout < 1:
        raise ValueError(f"LoRA needs r >= 1, alpha > 0 and dropout in [0, 1); got r={r} alpha={alpha} "
                         f"dropout={dropout}")
    if any(LORA_MARK in n for n, _ in llm.named_parameters()):
        raise ValueError("the model already has LoRA adapters")
    targets = _check_targets(llm, list(target_modules) if target_modules else default_target_modules(llm))
    conf = LoraConfig(r=int(r), lora_alpha=float(alpha), lora_dropout=float(dropout), target_modules=targets,
                      bias="none")
    model = inject_adapter_in_model(conf, llm, adapter_name=ADAPTER)  # also freezes all but the adapters
    cast_adapter_dtype(model, ADAPTER, autocast_adapter_dtype=True)   # bf16/fp16 adapters -> fp32
    for n, p in model.named_parameters():  # say it, rather than rely on peft's default
        p.requires_grad_(LORA_MARK in n)
    return model


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """fp32 CPU copies of the adapter weights, keyed by their parameter names in `model`.
    (Under DeepSpeed ZeRO-3 the parameters are partitioned: gather them first, as the tallrec job does.)"""
    out = {n: p.detach().to("cpu", torch.float32).contiguous().clone()
           for n, p in model.named_parameters() if LORA_MARK in n}
    if not out:
        raise ValueError("the model has no LoRA adapters (call add_lora first)")
    return out


def save_lora(state: Mapping[str, torch.Tensor], path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write adapter weights (from `lora_state`) as safetensors; `meta` goes into its JSON header."""
    from safetensors.torch import save_file
    path = Path(path)
    header = {"format": "allmrec-lora", **{k: json.dumps(v) for k, v in (meta or {}).items()}}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=header)
    return path


def lora_targets_from_state(state: Mapping[str, torch.Tensor]) -> list[str]:
    # "model.layers.0.self_attn.q_proj.lora_A.default.weight" -> "q_proj"
    return sorted({k.split(LORA_MARK, 1)[0].rsplit(".", 1)[-1] for k in state})


def load_lora(llm: nn.Module, state: Mapping[str, torch.Tensor] | str | Path, cfg: Any,
              merge: bool = False) -> nn.Module:
    """Put saved adapters back on a freshly loaded base `llm`: a frozen model in eval mode.

    `state`: a dict from `lora_state` or the path of a safetensors file. `cfg` gives `lora_r`,
    `lora_alpha` and `target_modules` (TallrecConfig); empty target_modules: the modules the saved
    weights name. Every saved tensor must find its parameter and vice versa (ValueError otherwise).
    `merge`: fold B·A·alpha/r into the base weights, so inference costs what the plain LLM costs; on a
    bf16 LLM that rounds the (small) update to bf16, so the default keeps the fp32 adapters separate.
    """
    if isinstance(state, (str, Path)):
        from safetensors.torch import load_file
        path = Path(state)
        if not path.is_file():
            raise FileNotFoundError(f"LoRA adapter file {path} not found")
        state = load_file(str(path))
    if not state or not all(LORA_MARK in k for k in state):
        raise ValueError("not a LoRA adapter state: expected parameter names containing '.lora_'")
    r = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if r != {int(cfg.lora_r)}:
        raise ValueError(f"the saved adapters have rank {sorted(r)} but the config says lora_r={cfg.lora_r}")
    model = add_lora(llm, cfg.lora_r, cfg.lora_alpha, 0.0, list(cfg.target_modules) or lora_targets_from_state(state))
    params = dict(model.named_parameters())
    expected = {n for n in params if LORA_MARK in n}
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise ValueError(f"adapter weights do not fit this model: {len(extra)} unexpected (e.g. {extra[:2]}), "
                         f"{len(missing)} missing (e.g. {missing[:2]}); same LLM and target_modules?")
    with torch.no_grad():
        for n, v in state.items():
            if params[n].shape != v.shape:
                raise ValueError(f"{n}: saved shape {tuple(v.shape)} != model shape {tuple(params[n].shape)}")
            params[n].copy_(v)
    if merge:
        from peft.tuners.lora import LoraLayer
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.merge()
    model.requires_grad_(False)
    return model.eval()
