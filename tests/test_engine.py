"""pipelines/engine.py without a process group: the config the frozen LLM is built under."""
from __future__ import annotations

import copy

import pytest
import torch

from pipelines import engine as eng


@pytest.mark.parametrize("dtype,bf16,fp16", [(torch.bfloat16, True, False), (torch.float16, False, True),
                                             (torch.float32, False, False)])
def test_zero_init_config_builds_the_llm_in_its_own_dtype_and_leaves_the_engine_config(dtype, bf16, fp16):
    from deepspeed.runtime.config import DeepSpeedConfig
    conf = eng.deepspeed_config("configs/deepspeed/zero3.json", micro_batch=4, zero_stage=3, bf16=False)
    before = copy.deepcopy(conf)
    init = DeepSpeedConfig(eng.zero_init_config(conf, dtype))
    # what zero.Init reads to pick the dtype it re-creates every parameter in
    assert init.bfloat16_config.enabled is bf16 and init.float16_config.enabled is fp16
    assert conf == before and not DeepSpeedConfig(conf).bfloat16_config.enabled  # projectors stay fp32
