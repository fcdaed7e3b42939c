"""Stage-1 of A-LLMRec: collaborative–text alignment (SBERT text encoder + aligner autoencoders)."""
from allmrec.align.sbert import (PACKAGED_SBERT, TextEncoder, TokenCache, encode_texts, load_sbert,
                                 load_text_encoder, sbert_dim)
from allmrec.align.stage1 import (Stage1Aligner, Stage1Model, joint_embeddings, stage1_losses,
                                  text_joint_embeddings)

__all__ = ["PACKAGED_SBERT", "TextEncoder", "TokenCache", "encode_texts", "load_sbert", "load_text_encoder",
           "sbert_dim", "Stage1Aligner", "Stage1Model", "joint_embeddings", "stage1_losses",
           "text_joint_embeddings"]
