"""Request and response bodies of the HTTP API (pydantic v2; FastAPI turns them into the OpenAPI schema).

Types are strict: `"5"` is not an item id and `5.0` is not a user id, so a client bug shows up as a
422 naming the field instead of a silently coerced request. Limits that depend on the deployment
(history length, candidate count) are checked by the ingress against `cfg.serve`; the hard limits
here only bound what a single request may carry at all.
"""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, StringConstraints, model_validator

MAX_NEW_ITEMS = 20
MAX_TITLE_CHARS = 300
MAX_DESCRIPTION_CHARS = 4000
MAX_K = 1000

# A new item's id: short, printable, and never an integer (integers are catalogue item ids).
NewItemId = Annotated[StrictStr, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:\-]+$")]
ItemRef = Union[StrictInt, NewItemId]


class NewItem(BaseModel):
    """A product the models never saw: it is embedded from its text (fine-tuned SBERT -> f_T^enc)."""
    model_config = ConfigDict(extra="forbid")

    id: NewItemId = Field(description="client-chosen id, referenced in `candidates` and echoed in the answer")
    title: Annotated[StrictStr, StringConstraints(min_length=1, max_length=MAX_TITLE_CHARS)]
    description: Annotated[StrictStr, StringConstraints(max_length=MAX_DESCRIPTION_CHARS)] = ""


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"user_id": 3, "k": 5},
        {"history": [12, 7, 301], "candidates": [5, 9, 44, "new-1"],
         "new_items": [{"id": "new-1", "title": "Solar lantern", "description": "A foldable camping lamp."}],
         "k": 3, "mode": "rank"},
    ]})

    user_id: StrictInt | None = Field(None, ge=0, description="a known user (its history is looked up)")
    history: list[StrictInt] | None = Field(None, description="catalogue item ids, oldest first (anonymous user)")
    candidates: list[ItemRef] | None = Field(
        None, description="catalogue item ids and/or new item ids to rank; omitted: the CF model's top-N")
    new_items: list[NewItem] = Field(default_factory=list, max_length=MAX_NEW_ITEMS,
                                     description="new products, always part of the candidate set")
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="how many items to return")
    mode: Literal["rank", "generate"] = Field(
        "rank", description="rank: order candidates by LLM likelihood; generate: the paper's greedy title")

    @model_validator(mode="after")
    def _one_user(self) -> "RecommendRequest":
        if (self.user_id is None) == (self.history is None):
            raise ValueError("give exactly one of user_id and history")
        return self


class ScoredItem(BaseModel):
    item: int | str = Field(description="catalogue item id, or the id of a new item")
    title: str
    score: float | None = Field(description="mean token log-likelihood of the title (rank mode); null in generate")


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    model_version: str
    mode: Literal["rank", "generate"]
    n_candidates: int = Field(description="size of the candidate set the LLM saw")
    generated: str | None = Field(None, description="the generated text (generate mode)")


class ErrorResponse(BaseModel):
    detail: str | list


class ModelInfo(BaseModel):
    model_version: str
    variant: str
    llm: str
    cf_model: str
    item_tokens: str
    use_user_token: bool
    n_items: int
    n_users: int
    new_items: bool = Field(description="whether new items given by text can be ranked")
    modes: list[str]
    limits: dict[str, int]
    aligner: dict | None = None


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
    model_version: str
