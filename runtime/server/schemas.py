"""Request and response bodies of the HTTP API (they are also its OpenAPI schema).

Models are strict (no silent "3" -> 3 coercion) and forbid unknown fields, so a typo in a field name is a
400 naming that field rather than a silently ignored setting.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Query
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from promptmux.core.task import MAX_NAME, task_name

MAX_TEXTS = 64  # texts per classification request
MAX_PROMPTS = 16  # prompts per completion request
MAX_STOPS = 4  # as OpenAI


def _unicode(value: str) -> str:
    """JSON lets a client send a lone surrogate ("\\ud800"), which is not text: no tokenizer, path or encoder
    takes it, so it is refused here with the field's name."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate such as \\ud800); send UTF-8 text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]  # every string a client sends


def _task_name(value: str) -> str:
    """A new task's name as the bank stores it (Unicode NFC), whose length is what the cap counts: "é" typed with a
    combining accent is one character, as everywhere else."""
    value = task_name(value)
    if len(value) > MAX_NAME:
        raise ValueError(f"at most {MAX_NAME} characters (in Unicode NFC), got {len(value)}")
    return value


Name = Annotated[Text, AfterValidator(_task_name)]  # a task name a client gives to a new task


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ErrorDetail(BaseModel):
    type: str = Field(description="invalid_request, invalid_json, not_found, unknown_task, too_large, "
                                  "unsupported_media_type, method_not_allowed, unauthorized, forbidden, conflict, "
                                  "overloaded, timeout, internal")
    field: str | None = Field(description="the request field (or body, path, method, authorization) at fault")
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


# ---- classification --------------------------------------------------------------------------
class ClassifyRequest(_Strict):
    task: Text = Field(min_length=1, max_length=256, description="the task (see GET /v1/models)")
    text: Text | None = Field(None, description="one text; give text or texts")
    texts: list[Text] | None = Field(None, min_length=1, max_length=MAX_TEXTS, description="several texts")


class ClassifyResult(BaseModel):
    label: str
    label_id: int
    scores: list[float] = Field(description="softmax over the task's labels, in label_id order")


class ClassifyResponse(BaseModel):
    task: str
    labels: list[str] | None = Field(description="the task's label names in label_id order, if it has them")
    results: list[ClassifyResult] = Field(description="one per input text, in order")


# ---- completions (OpenAI-compatible) ----------------------------------------------------------
class PromptEmbeds(_Strict):
    shape: list[int] = Field(min_length=2, max_length=2, description="[virtual tokens, hidden size]")
    dtype: Literal["float32", "bfloat16"]
    data: str = Field(min_length=1, description="base64 of the little-endian values, row-major")


class CompletionRequest(_Strict):
    model: Text = Field(min_length=1, max_length=256, description="the task name")
    prompt: Text | list[Text] = Field(description=f"a prompt, or up to {MAX_PROMPTS} prompts (one choice each)")
    max_tokens: int = Field(16, ge=1, description="new tokens per prompt (prompt + virtual tokens + max_tokens must "
                                                  "fit the model's positions)")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, description="not in OpenAI's API: sample from the k most likely tokens (0: off)")
    stop: Text | list[Text] | None = Field(None, description=f"up to {MAX_STOPS} stop strings")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same tokens")
    stream: bool = Field(False, description="server-sent events, one chunk per token, then data: [DONE]")
    n: int = Field(1, ge=1, le=1, description="only 1")
    echo: bool = Field(False, description="only false")
    user: Text | None = Field(None, max_length=256, description="ignored")
    prompt_embeds: PromptEmbeds | None = Field(None, description="not in OpenAI's API: this request's own soft "
                                               "prompt, with model = the served model name (serve "
                                               "--allow-inline-prompts)")


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length"] | None
    logprobs: None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


# ---- models and tasks ------------------------------------------------------------------------
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "promptmux"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
    has_more: bool = False  # more tasks follow: ask again with after=last_id
    last_id: str | None = None


class AddTaskRequest(_Strict):
    name: Name = Field(min_length=1, max_length=4 * MAX_NAME,  # (decomposed: up to 4 code points a character)
                       description="the new task's name (an MPT adapter with K tasks adds NAME/0 ... NAME/K-1)")
    adapter: Text = Field(min_length=1, max_length=1024, description="the PEFT adapter folder, relative to the "
                                                                    "server's --adapter-root")
    replace: bool = Field(False, description="replace a task of the same name")


class UploadedAdapter(_Strict):
    name: Name = Field(min_length=1, max_length=4 * MAX_NAME,
                       description="the task's name (an MPT adapter with K tasks adds NAME/0 ... NAME/K-1)")
    adapter_config: dict = Field(description="the adapter's adapter_config.json, as JSON")
    adapter_model: str = Field(min_length=1, description="the adapter's adapter_model.safetensors, base64 (standard "
                                                         "alphabet); nothing else is read, nothing is unpickled")
    labels: dict | None = Field(None, description="labels.json, if the adapter has one: {\"id2label\": {...}}")


class UploadTasksRequest(_Strict):
    tasks: list[UploadedAdapter] = Field(min_length=1, max_length=1000, description="added in one transaction: "
                                         "all of them or, if any is refused, none")
    replace: bool = Field(False, description="replace tasks of the same names")


class TaskChange(BaseModel):
    added: list[str] = []
    replaced: list[str] = Field([], description="replace=true: the tasks of the same adapters, now replaced")
    removed: list[str] = []
    tasks: int = Field(description="how many tasks are served after the change (GET /v1/tasks lists them)")


class TaskList(BaseModel):
    tasks: list[dict]
    has_more: bool = False  # more tasks follow: ask again with after=last_id
    last_id: str | None = None


class TaskPage:
    """The query parameters of a paged task listing (/v1/models, GET /v1/tasks)."""

    MAX = 1000  # a page holds at most this many tasks (the default)

    def __init__(self, limit: int = Query(MAX, ge=1, le=MAX, description="tasks per page (at most 1,000)"),
                 after: str | None = Query(None, max_length=1024, description="the last task name of the previous "
                                                                              "page (a cursor)")):
        self.limit, self.after = limit, after


class PreparedEngine(BaseModel):
    graph: str  # model.onnx, model_noprefix.onnx, model_folded.onnx, or "decoder"
    engine: str  # onnxruntime, openvino, ...
    seconds: float  # the build and the first run
    ran: bool  # False: built only (no task of the deployment runs that graph yet)


class Routing(BaseModel):  # backend onnxruntime+openvino: where batches go (runtime/routing.py)
    small_positions: int | None  # batches up to this many positions run on ONNX Runtime; None: all of them
    engines: list[str]  # the engines the split can pick
    measured: str | None  # when it was measured on this CPU; None: given by hand (or the default)


class Health(BaseModel):
    status: str
    tasks: int | None = None
    backend: str | None = None  # what actually runs the graphs (after "auto" chose)
    backend_reason: str | None = None  # why "auto" chose it
    routing: Routing | None = None
    precision: str | None = None
    # every engine the routing can pick, built and run once before the server reported ready (runtime/prepare.py)
    prepared: list[PreparedEngine] | None = None
