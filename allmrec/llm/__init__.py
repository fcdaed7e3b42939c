"""LLM side of A-LLMRec: loading the frozen LLM, the prompt with soft tokens, Stage-2, ranking."""
from .loading import load_llm, prepare_tokenizer, resolve_llm_source
from .prompt import (Encoded, Placeholders, PromptBuilder, collate, embed_with_soft_tokens, lm_forward,
                     splice_soft_tokens)
from .ranking import generate_title, generate_titles, match_candidate, rank_candidates
from .stage2 import Stage2Projector, soft_prompt_embeds, stage2_loss

__all__ = [
    "load_llm", "prepare_tokenizer", "resolve_llm_source", "Encoded", "Placeholders", "PromptBuilder",
    "collate", "embed_with_soft_tokens", "lm_forward", "splice_soft_tokens", "generate_title",
    "generate_titles", "match_candidate", "rank_candidates", "Stage2Projector", "soft_prompt_embeds",
    "stage2_loss",
]
