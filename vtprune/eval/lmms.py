"""The lmms-eval model `vtprune`: HF LLaVA-1.5 / LLaVA-NeXT with a vtprune method applied.

    python -m lmms_eval --model vtprune \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=flowcut,keep=64 --tasks mme,pope

Registered through the entry point group `lmms_eval.models` (see pyproject.toml), which lmms-eval
reads when it builds its model registry; `MANIFEST` (a `ModelManifest`) is the payload.

Model arguments (`--model_args k=v,...`):

- `pretrained`: an HF checkpoint (name or local path) of type llava or llava_next; a built-in
  random-weight model (`tiny`, `tiny-next`, `tiny-small`, `tiny-next-small` in float32, or a shape
  of `vtprune.eval.shapes` such as `llava-0.5b`); or nothing / `offline` for the default offline
  model (`load_offline_model`: vtprune's trained offline LLaVA-1.5 where `vtprune.trained` has it,
  else the random-weight tiny LLaVA).
- `method` (default `none`: the unpatched model, the unpruned baseline) and any parameter of that
  method (`keep`, `keep_ratio`, `official`, `position_mode`, the method's own; `vtprune methods`).
- `batch_size`: any size; prompts are left-padded and batched.
- `device`, `dtype` (`auto`, `float16`, `bfloat16`, `float32`), `device_map` (`auto` shards one
  model over the visible GPUs), `attn_implementation`, `revision`, `trust_remote_code`.
- Comparability switches (they move the unpruned baseline too; see docs/EVAL.md): `do_pad=true`
  pads each image to a square with the processor's mean colour before preprocessing (LLaVA-1.5's
  original `image_aspect_ratio=pad`; the HF processor centre-crops instead); `fixed_grid=672`
  (or `672x672`) resizes every image to that size first, so LLaVA-NeXT always uses the same AnyRes
  grid; `chat_template=vicuna_v1` uses the original LLaVA conversation prompt (system line +
  `USER: <image>\\n... ASSISTANT:`), any other value is a Jinja template or a path to one.
- `max_new_tokens`: the default when a task does not set one (1024, as lmms-eval's llava_hf).

What the run did is recorded: the log states the method and its resolved parameters; the results
file holds `config.model_args` (method and parameters as given) and, under `throughput`, the
per-sample means `avg_vtprune_visual_tokens` (visual tokens entering the LLM),
`avg_vtprune_mean_tokens` (visual tokens averaged over decoder layers, for in-LLM methods),
`avg_vtprune_available_tokens` (the unpruned count) and `avg_vtprune_prefill_s`. `stats` keeps the
same per task for the Python API (`vtprune sweep` reads it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

import torch
from lmms_eval.api.model import lmms
from loguru import logger as eval_logger
from tqdm import tqdm

from .. import api, registry
from ..errors import VTPruneError

MODEL_ID = "vtprune"


def __getattr__(name):
    # `MANIFEST` (the entry point's payload) is built on first access: importing
    # lmms_eval.models.registry_v2 here at import time would initialise lmms_eval.models, whose
    # registry loads entry points, i.e. this half-imported module, and miss the manifest.
    if name == "MANIFEST":
        from lmms_eval.models.registry_v2 import ModelManifest

        manifest = ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VTPrune")
        globals()["MANIFEST"] = manifest
        return manifest
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# The original LLaVA-1.5 evaluation prompt (conv_vicuna_v1): system line, then USER/ASSISTANT turns.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_NAMED_TEMPLATES = ("vicuna_v1",)
_OFFLINE_NAMES = (None, "", "offline", "default")
# vtprune.testing's tiny random-weight models in float32 (plumbing tests); `small` is 112 px, 64 patches
_TINY = {
    "tiny": ("tiny_llava", "default"),
    "tiny-next": ("tiny_llava_next", "default"),
    "tiny-small": ("tiny_llava", "small"),
    "tiny-next-small": ("tiny_llava_next", "small"),
}


class GenerationFailed(RuntimeError):
    """model.generate (or the forward of a loglikelihood batch) raised; the batch is named."""


OFFLINE_VARIANT = "llava15"


def _trained_module():
    """`vtprune.trained` (the trained offline models: `load(variant, dtype, device)` and
    `available(variant)`), or None where this install has none (or an older one without that API)."""
    import importlib

    try:
        mod = importlib.import_module("vtprune.trained")
    except ModuleNotFoundError as e:
        if e.name not in ("vtprune.trained",):
            raise  # the module exists but one of its own imports is missing: a real error
        return None
    if not (callable(getattr(mod, "available", None)) and callable(getattr(mod, "load", None))):
        return None
    return mod


def offline_model_is_trained() -> bool:
    """Whether the default offline model is the trained one (vtprune.trained has its weights)."""
    trained = _trained_module()
    return trained is not None and bool(trained.available(OFFLINE_VARIANT))


def load_offline_model(dtype=None, device: str | None = None):
    """(model, processor, label) of the default offline model: the one place that names it.

    vtprune's trained offline LLaVA-1.5 (`vtprune.trained.load("llava15")`) where it is installed
    and its weights are available; otherwise the built-in tiny random-weight LLaVA (its answers are
    meaningless: plumbing only)."""
    if offline_model_is_trained():
        model, proc = _trained_module().load(variant=OFFLINE_VARIANT, dtype=dtype, device=device)
        return model, proc, f"vtprune's trained offline LLaVA-1.5 (vtprune.trained, {OFFLINE_VARIANT})"
    from ..testing import tiny_llava

    model, proc = tiny_llava()
    if dtype is not None:
        model = model.to(dtype)
    label = "built-in offline tiny LLaVA (random weights: answers are meaningless; the trained offline model is not installed)"
    return model.to(device or "cpu"), proc, label


def _resolve_dtype(dtype):
    if dtype is None or isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    names = {
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    }  # fmt: skip
    if dtype not in names:
        raise VTPruneError(f"dtype must be one of auto, {', '.join(sorted(names))}; got {dtype!r}")
    return names[dtype]


def _parse_size(value) -> tuple[int, int] | None:
    if value in (None, "", False, "none", "None"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    parts = str(value).lower().replace("*", "x").split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
    except ValueError:
        raise VTPruneError(f"fixed_grid must be a size like 672 or 672x672, got {value!r}") from None
    if w <= 0 or h <= 0 or len(parts) > 2:
        raise VTPruneError(f"fixed_grid must be a size like 672 or 672x672, got {value!r}")
    return (w, h)


def _as_bool(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.lower() in ("true", "1", "yes")
    raise VTPruneError(f"{name} must be true or false, got {value!r}")


@dataclass
class TaskStats:
    """Per-sample sums for one task (divide by `samples` for the means)."""

    samples: int = 0
    visual_tokens: float = 0.0
    mean_tokens: float = 0.0
    available_tokens: float = 0.0
    prefill_s: float = 0.0
    generated_tokens: int = 0

    def add(self, rec: dict) -> None:
        self.samples += 1
        self.visual_tokens += rec["visual_tokens"]
        self.mean_tokens += rec["mean_tokens"]
        self.available_tokens += rec["available_tokens"]
        self.prefill_s += rec["prefill_s"]
        self.generated_tokens += rec["generated_tokens"]

    def means(self) -> dict:
        n = max(self.samples, 1)
        return {
            "samples": self.samples,
            "mean_visual_tokens": self.visual_tokens / n,
            "mean_tokens": self.mean_tokens / n,
            "mean_available_tokens": self.available_tokens / n,
            "mean_prefill_s": self.prefill_s / n,
        }


@dataclass
class _Timer:
    """Wall time from `start()` to the end of the model's next forward call (synchronising CUDA):
    for generate() the prefill including the vision tower and the pruning step."""

    devices: list = field(default_factory=list)
    armed: bool = False
    t0: float = 0.0
    elapsed: float | None = None

    def sync(self) -> None:
        for d in self.devices:
            torch.cuda.synchronize(d)

    def start(self) -> None:
        self.sync()
        self.elapsed = None
        self.armed = True
        self.t0 = time.perf_counter()

    def hook(self, module, args, kwargs, output) -> None:
        if self.armed:
            self.sync()
            self.elapsed = time.perf_counter() - self.t0
            self.armed = False


class VTPrune(lmms):
    """lmms-eval model: a HF LLaVA-1.5 / LLaVA-NeXT checkpoint pruned by a vtprune method."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        method: str = "none",
        batch_size: int | str = 1,
        device: str | None = None,
        dtype: str | None = "auto",
        device_map: str | None = "",
        attn_implementation: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        do_pad: bool = False,
        fixed_grid=None,
        chat_template: str | None = None,
        max_new_tokens: int = 1024,
        use_cache: bool = True,
        max_batch_size=None,  # lmms-eval passes it; batches are fixed-size here
        model=None,
        processor=None,
        **method_params,
    ) -> None:
        super().__init__()
        # validate everything before loading weights
        try:
            registry.build(method, **method_params)
        except VTPruneError as e:
            raise VTPruneError(
                f"{e}. (Model arguments of the vtprune lmms-eval model: pretrained, method, batch_size, device, dtype, device_map, "
                "attn_implementation, revision, trust_remote_code, do_pad, fixed_grid, chat_template, max_new_tokens, use_cache; "
                "everything else goes to the method.)"
            ) from None
        if str(batch_size).startswith("auto"):
            raise VTPruneError("batch_size=auto is not supported by the vtprune model; give a number")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise VTPruneError(f"batch_size must be >= 1, got {batch_size!r}")
        self.do_pad = _as_bool(do_pad, "do_pad")
        self.fixed_grid = _parse_size(fixed_grid)
        self.use_cache = _as_bool(use_cache, "use_cache")
        self.max_new_tokens = int(max_new_tokens)
        self.chat_template = self._load_template(chat_template)
        self.show_progress = True
        self.keep_loaded = False  # clean() frees the model unless a caller (vtprune sweep) reuses it

        from accelerate import Accelerator

        accelerator = Accelerator()
        self.accelerator = accelerator
        device_map = device_map or ""
        if accelerator.num_processes > 1:
            if device_map:
                raise VTPruneError(
                    f"device_map={device_map!r} shards one model over the visible GPUs: run it as one process (python -m lmms_eval ...), "
                    "not under accelerate launch (which runs one full copy per process)"
                )
            device = f"cuda:{accelerator.local_process_index}" if torch.cuda.is_available() else "cpu"
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._rank = accelerator.process_index
        self._world_size = accelerator.num_processes
        if self._world_size == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # launched as several processes that accelerate does not drive itself (CPU ranks under
            # torchrun/gloo): lmms-eval shards by RANK / WORLD_SIZE, so do we
            self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ["WORLD_SIZE"])

        self.pretrained = pretrained
        if model is not None:
            if processor is None:
                raise VTPruneError("pass processor= together with model=")
            self.label = f"{type(model).__name__} instance"
        else:
            model, processor, self.label = self._load(pretrained, _resolve_dtype(dtype), device, device_map, attn_implementation, revision, _as_bool(trust_remote_code, "trust_remote_code"))
        self._model = model.eval()
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self._tokenizer.padding_side = "left"
        self._family = api._adapter(self._model).family  # raises for models vtprune cannot patch
        if self.fixed_grid is not None and self._family != "llava_next":
            raise VTPruneError("fixed_grid is a LLaVA-NeXT (AnyRes) setting; for LLaVA-1.5 use do_pad=true to keep the whole image")
        self._image_token = getattr(processor, "image_token", None) or "<image>"
        self._image_token_id = self._model.config.image_token_id
        ip = getattr(processor, "image_processor", None)
        mean = getattr(ip, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]
        self._pad_colour = tuple(int(255 * m) for m in mean)  # as LLaVA's expand2square
        self._device = self._input_device()
        cuda = {p.device for p in self._model.parameters() if p.device.type == "cuda"}
        self._timer = _Timer(devices=sorted(cuda, key=str))
        self._timer_handle = self._model.register_forward_hook(self._timer.hook, with_kwargs=True)
        self._pruner = None
        self.method = "none"
        self.method_params: dict = {}
        self.stats: dict[str, TaskStats] = {}
        self._pending: list[dict] = []
        try:
            self.set_method(method, **method_params)
        except BaseException:
            self.close()  # e.g. a method that does not serve this model family: leave the model as it was
            raise

    # --- loading ----------------------------------------------------------------------------------
    @staticmethod
    def _load(pretrained, dtype, device, device_map, attn_implementation, revision, trust_remote_code):
        from .shapes import SHAPES, load_model

        if pretrained in _OFFLINE_NAMES:
            return load_offline_model(None if dtype == "auto" else dtype, device)
        if pretrained in _TINY:
            from .. import testing

            build, size = _TINY[pretrained]
            model, proc = getattr(testing, build)(size, dtype=torch.float32 if dtype in (None, "auto") else dtype)
            return model.to(device), proc, f"built-in random-weight {pretrained} (answers are meaningless)"
        if pretrained in SHAPES:
            return load_model(pretrained, None if dtype == "auto" else dtype, device)
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        extra = {"trust_remote_code": trust_remote_code}
        if revision:
            extra["revision"] = revision
        config = AutoConfig.from_pretrained(pretrained, **extra)
        if config.model_type not in ("llava", "llava_next"):
            raise VTPruneError(f"{pretrained} is a {config.model_type!r} checkpoint; the vtprune model serves llava (LLaVA-1.5) and llava_next (LLaVA-NeXT)")
        kw = dict(extra, dtype=dtype or "auto")
        if attn_implementation:
            kw["attn_implementation"] = attn_implementation
        if device_map:
            kw["device_map"] = device_map
        model = AutoModelForImageTextToText.from_pretrained(pretrained, **kw)
        if not device_map:
            model = model.to(device)
        processor = AutoProcessor.from_pretrained(pretrained, **extra)
        return model, processor, pretrained

    @staticmethod
    def _load_template(value):
        if value in (None, ""):
            return None
        if value in _NAMED_TEMPLATES:
            return value
        if os.path.isfile(str(value)):
            with open(value, encoding="utf-8") as f:
                return f.read()
        if "{" not in str(value):
            raise VTPruneError(f"chat_template must be one of {', '.join(_NAMED_TEMPLATES)}, a Jinja template or a path to one; got {value!r}")
        return str(value)

    def _input_device(self) -> torch.device:
        emb = self._model.get_input_embeddings()
        return emb.weight.device

    # --- the method -------------------------------------------------------------------------------
    def set_method(self, method: str = "none", **params) -> None:
        """Patch the (already loaded) model with `method` (unpatching the previous one); `none`
        leaves it unpatched. No reload: a sweep calls this between evaluations."""
        built = registry.build(method, **params)
        if self._pruner is not None:
            self._pruner.unpatch()
            self._pruner = None
        if built.name == "none":
            self.method, self.method_params = "none", {}
        else:
            self._pruner = api.patch(self._model, built)
            self.method, self.method_params = built.name, built.params()
        if self.rank == 0:
            eval_logger.info(f"vtprune: {self.label}, method {self.method} {json.dumps(self.method_params, default=str)}")

    def reset_stats(self) -> None:
        self.stats = {}
        self._pending = []

    def summary(self) -> dict:
        """Method, parameters and the per-sample means over every task seen since reset_stats()."""
        total = TaskStats()
        for s in self.stats.values():
            for k in ("samples", "visual_tokens", "mean_tokens", "available_tokens", "prefill_s", "generated_tokens"):
                setattr(total, k, getattr(total, k) + getattr(s, k))
        return {"method": self.method, "params": self.method_params, **total.means(), "tasks": {t: s.means() for t, s in self.stats.items()}}

    # --- lmms-eval properties -------------------------------------------------------------------
    @property
    def model(self):
        return self._model

    @property
    def config(self):
        return self._model.config

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def device(self):
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def family(self) -> str:
        return self._family

    # --- inputs -----------------------------------------------------------------------------------
    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        from PIL import Image

        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        out = []
        for v in visuals:
            if isinstance(v, (list, tuple)):
                out.extend(v)
            else:
                out.append(v)
        images = []
        for v in out:
            if not isinstance(v, Image.Image):
                raise VTPruneError(f"task {task}: the vtprune model takes images; doc {doc_id} gives a {type(v).__name__} ({str(v)[:80]!r})")
            images.append(self._prepare_image(v))
        return images

    def _prepare_image(self, image):
        from PIL import Image

        image = image.convert("RGB")
        if self.do_pad:
            w, h = image.size
            if w != h:
                side = max(w, h)
                square = Image.new("RGB", (side, side), self._pad_colour)
                square.paste(image, ((side - w) // 2, (side - h) // 2))
                image = square
        if self.fixed_grid is not None and image.size != self.fixed_grid:
            image = image.resize(self.fixed_grid, Image.BICUBIC)
        return image

    def _prompt(self, context: str, n_images: int) -> str:
        text = context
        if n_images and self._image_token in text:
            # images go first, as in LLaVA's own prompts
            text = text.replace(self._image_token, "").strip()
        if self.chat_template == "vicuna_v1":
            return f"{VICUNA_V1_SYSTEM} USER: {(self._image_token + chr(10)) * n_images}{text} ASSISTANT:"
        content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
        template = self.chat_template or getattr(self.processor, "chat_template", None)
        if template:
            return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, chat_template=template)
        return f"USER: {(self._image_token + chr(10)) * n_images}{text} ASSISTANT:"

    def _encode(self, texts: list[str], images: list):
        self._tokenizer.padding_side = "left"
        kw = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kw["images"] = images
        inputs = self.processor(**kw)
        dtype = self._model.dtype
        out = {}
        for k, v in inputs.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self._device)
                if v.is_floating_point():
                    v = v.to(dtype)
            out[k] = v
        return out

    # --- bookkeeping ------------------------------------------------------------------------------
    def _batch_records(self, reqs, inputs, prefill_s: float, elapsed: float, generated: list[int]) -> None:
        """Per-sample records of one batch (visual tokens from pruner.last, or counted in the
        prompt for the unpatched model)."""
        n = len(reqs)
        visual = [0.0] * n
        layered = [0.0] * n
        available = [0.0] * n
        rep = self._pruner.last if self._pruner is not None else None
        if rep is not None and rep.num_images:
            for i, b in enumerate(rep.sample_of):
                visual[b] += rep.num_visual_tokens[i]
                layered[b] += rep.mean_tokens[i]
                available[b] += rep.available[i]
        elif "input_ids" in inputs:
            counts = (inputs["input_ids"] == self._image_token_id).sum(1).tolist()
            visual, layered, available = list(map(float, counts)), list(map(float, counts)), list(map(float, counts))
        for b, req in enumerate(reqs):
            if (getattr(req, "metadata", None) or {}).get("__padding_only__"):
                continue  # a rank's filler copy (multi-process runs)
            self._pending.append(
                {
                    "task": getattr(req, "task_name", None) or "?",
                    "visual_tokens": float(visual[b]),
                    "mean_tokens": float(layered[b]),
                    "available_tokens": float(available[b]),
                    "prefill_s": prefill_s / n,
                    "elapsed_s": elapsed / n,
                    "generated_tokens": int(generated[b]),
                }
            )

    def _flush_records(self) -> None:
        """Gather this evaluation's per-sample records from every rank; rank 0 logs them to
        lmms-eval's metric history (they end up under `throughput` in the results file)."""
        records = self._pending
        self._pending = []
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in (part or [])]
        for r in records:
            self.stats.setdefault(r["task"], TaskStats()).add(r)
        if self.rank != 0 or not records:
            return
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        name = "lmms_eval.models.model_utils.gen_metrics"
        eval_logger.disable(name)  # one record per sample; the summary line below replaces the per-record lines
        try:
            for r in records:
                t = r["elapsed_s"]
                log_metrics(
                    total_elapsed_time=t,
                    total_gen_tokens=r["generated_tokens"],
                    avg_speed=r["generated_tokens"] / t if t > 0 else 0.0,
                    additional_metrics={
                        "vtprune_visual_tokens": r["visual_tokens"],
                        "vtprune_mean_tokens": r["mean_tokens"],
                        "vtprune_available_tokens": r["available_tokens"],
                        "vtprune_prefill_s": r["prefill_s"],
                    },
                )
        finally:
            eval_logger.enable(name)
        s = self.summary()
        eval_logger.info(
            f"vtprune: method={s['method']} params={json.dumps(s['params'], default=str)} samples={s['samples']} "
            f"mean visual tokens={s['mean_visual_tokens']:.1f} (over layers {s['mean_tokens']:.1f}, unpruned {s['mean_available_tokens']:.1f}) "
            f"mean prefill={s['mean_prefill_s'] * 1000:.1f} ms/sample"
        )

    def clean(self):
        # lmms-eval calls this on every rank once all requests of an evaluation have run
        self._flush_records()
        if self.keep_loaded:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        self.close()
        super().clean()

    def close(self) -> None:
        """Unpatch and drop the timing hook (the model is as loaded)."""
        if self._pruner is not None:
            self._pruner.unpatch()
            self._pruner = None
        if getattr(self, "_timer_handle", None) is not None:
            self._timer_handle.remove()
            self._timer_handle = None

    # --- batching ---------------------------------------------------------------------------------
    def _batches(self, keys: list, lengths: list[int]):
        """Indices grouped by key (requests with different generation settings never share a
        batch), longest first within a group, cut into batches of batch_size."""
        order = sorted(range(len(keys)), key=lambda i: (keys[i], -lengths[i], i))
        batch: list[int] = []
        for i in order:
            if batch and (keys[batch[0]] != keys[i] or len(batch) == self.batch_size):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def _progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=(self.rank != 0 or not self.show_progress))

    # --- generate_until -------------------------------------------------------------------------
    def generate_until(self, requests) -> list[str]:
        if not requests:
            return []
        keys = [json.dumps(r.args[1], sort_keys=True, default=str) for r in requests]
        out: list[str | None] = [None] * len(requests)
        bar = self._progress(len(requests), "vtprune generate")
        try:
            for idx in self._batches(keys, [len(r.args[0]) for r in requests]):
                for i, text in zip(idx, self._generate_batch([requests[i] for i in idx])):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), text)
                bar.update(len(idx))
        finally:
            bar.close()
        return out

    def _generate_batch(self, reqs) -> list[str]:
        prompts, images = [], []
        for req in reqs:
            context, _, doc_to_visual, doc_id, task, split = req.args
            visuals = self._visuals(doc_to_visual, task, split, doc_id)
            images.extend(visuals)
            prompts.append(self._prompt(context, len(visuals)))
        gen = dict(reqs[0].args[1] or {})
        until = gen.pop("until", None)
        if isinstance(until, str):
            until = [until]
        elif until is not None and not isinstance(until, (list, tuple)):
            raise VTPruneError(f"generation_kwargs['until'] must be a string or a list of strings, got {type(until).__name__}")
        until = [u for u in (until or []) if u]
        max_new = int(gen.pop("max_new_tokens", None) or self.max_new_tokens)
        temperature = float(gen.pop("temperature", 0) or 0)
        top_p = gen.pop("top_p", None)
        num_beams = int(gen.pop("num_beams", 1) or 1)
        gen.pop("do_sample", None)  # sampling iff temperature > 0, as lmms-eval's own models do
        kwargs = {"max_new_tokens": max_new, "num_beams": num_beams, "use_cache": self.use_cache, "do_sample": temperature > 0}
        if temperature > 0:
            kwargs["temperature"] = temperature
            if top_p is not None:
                kwargs["top_p"] = float(top_p)
        pad = self._tokenizer.pad_token_id if self._tokenizer.pad_token_id is not None else self._tokenizer.eos_token_id
        if pad is not None:
            kwargs["pad_token_id"] = pad
        inputs = self._encode(prompts, images)
        T = inputs["input_ids"].shape[1]
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                self._timer.start()
                seqs = self._model.generate(**inputs, **kwargs)
                self._timer.sync()
                elapsed = time.perf_counter() - t0
        except Exception as e:
            self._timer.armed = False
            docs = ", ".join(f"{r.args[4]}/{r.args[3]}" for r in reqs)
            raise GenerationFailed(f"vtprune: generation failed (method {self.method}) for task/doc {docs}: {type(e).__name__}: {e}") from e
        prefill = self._timer.elapsed if self._timer.elapsed is not None else elapsed
        new = seqs[:, T:]
        eos = self._tokenizer.eos_token_id
        generated = []
        for row in new.tolist():
            n = 0
            for t in row:
                if t == eos or (pad is not None and t == pad and pad != eos):
                    break
                n += 1
            generated.append(n)
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        cut = []
        for text in texts:
            for u in until:
                pos = text.find(u)
                if pos >= 0:
                    text = text[:pos]
            cut.append(text)
        self._batch_records(reqs, inputs, prefill, elapsed, generated)
        return cut

    # --- loglikelihood --------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list:
        """Per request `(nll, is_greedy)`: the continuation's negative log-likelihood summed over
        its tokens (lmms-eval's convention: its multiple-choice scoring takes the argmin, and
        llava_hf returns a loss), and whether greedy decoding would produce it.

        lmms-eval 0.7.3 turns any non-string model output into its `str()` before scoring, which
        breaks every multiple-choice task; when the installed version does that, each pair is
        handed over inside a `GenerationResult` (which it passes through unchanged)."""
        pairs = self.loglikelihood_pairs(requests)
        if _WRAP_PAIRS:
            from lmms_eval.api.instance import GenerationResult

            return [GenerationResult(text=p) for p in pairs]
        return pairs

    def loglikelihood_pairs(self, requests) -> list[tuple[float, bool]]:
        """`loglikelihood` as plain `(nll, is_greedy)` tuples."""
        if not requests:
            return []
        items = []
        for req in requests:
            args = req.args
            if len(args) == 2:  # unconditional requests (acc_mutual_info): no image
                context, continuation = args
                visuals = []
            else:
                context, target, doc_to_visual, doc_id, task, split = args
                continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
                visuals = self._visuals(doc_to_visual, task, split, doc_id)
            if not isinstance(continuation, str):
                continuation = str(continuation)
            prompt = self._prompt(context, len(visuals))
            items.append((prompt, continuation, visuals))
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = self._progress(len(requests), "vtprune loglikelihood")
        try:
            for idx in self._batches([""] * len(items), [len(p) + len(c) for p, c, _ in items]):
                for i, res in zip(idx, self._loglikelihood_batch([items[i] for i in idx], [requests[i] for i in idx])):
                    out[i] = res
                bar.update(len(idx))
        finally:
            bar.close()
        return out

    def continuation_lengths(self, prompts: list[str], continuations: list[str]) -> list[int]:
        """Tokens of each continuation: len(tok(prompt + continuation)) - len(tok(prompt)), the
        continuation being the tail of the joint tokenization (the harness convention)."""
        tok = self._tokenizer
        out = []
        for p, c in zip(prompts, continuations):
            n = len(tok(p + c)["input_ids"]) - len(tok(p)["input_ids"])
            if n <= 0:
                raise VTPruneError(f"the continuation {c!r} adds no token to the prompt; cannot score it")
            out.append(n)
        return out

    def _loglikelihood_batch(self, items, reqs) -> list[tuple[float, bool]]:
        prompts = [p for p, _, _ in items]
        conts = [c for _, c, _ in items]
        images = [im for _, _, ims in items for im in ims]
        lengths = self.continuation_lengths(prompts, conts)
        inputs = self._encode([p + c for p, c in zip(prompts, conts)], images)
        ids = inputs["input_ids"]
        T = ids.shape[1]
        k = max(lengths) + 1
        try:
            with torch.inference_mode():
                self._timer.start()
                t0 = time.perf_counter()
                logits = self._model(**inputs, use_cache=False, logits_to_keep=k).logits
                self._timer.sync()
                elapsed = time.perf_counter() - t0
        except Exception as e:
            self._timer.armed = False
            docs = ", ".join(f"{r.task_name}/{r.doc_id}" for r in reqs)
            raise GenerationFailed(f"vtprune: forward failed (method {self.method}) for task/doc {docs}: {type(e).__name__}: {e}") from e
        logp = torch.log_softmax(logits.float(), dim=-1)
        rep = self._pruner.last if self._pruner is not None else None
        results = []
        for b, L in enumerate(lengths):
            # positions T-L-1 .. T-2 of the caller's sequence predict the continuation T-L .. T-1
            src = torch.arange(T - L - 1, T, device=ids.device)
            pos = position_in_output(rep, b, src)
            local = pos[:-1] - pos[-1] + (k - 1)  # index into the last k logits (pos[-1] is the last position)
            if bool((local < 0).any()) or bool((local >= k).any()):
                raise VTPruneError("continuation positions fell outside the kept logits; this is a vtprune bug, please report it")
            target = ids[b, T - L :]
            lp = logp[b, local.to(logp.device)]
            nll = -float(lp.gather(-1, target.to(lp.device)[:, None]).sum())
            greedy = bool((lp.argmax(-1) == target.to(lp.device)).all())
            results.append((nll, greedy))
        self._batch_records(reqs, inputs, elapsed, elapsed, [0] * len(reqs))
        return results

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vtprune lmms-eval model does not implement multi-round generation")


def _pairs_need_wrapping() -> bool:
    """Whether lmms-eval's evaluator would stringify a `(float, bool)` model output."""
    try:
        from lmms_eval.api.instance import unwrap_generation_output
    except ImportError:  # pragma: no cover - older lmms-eval: outputs are used as returned
        return False
    probe = (-1.5, True)
    return unwrap_generation_output(probe)[0] != probe


_WRAP_PAIRS = _pairs_need_wrapping()


def position_in_output(report, b: int, positions: torch.Tensor) -> torch.Tensor:
    """Where positions of the caller's sequence (row b) sit in the logits of a pruned forward:
    `new_index` maps them into the shrunk LLM input, `output_index` (in-LLM methods) into the
    output. Identity for an unpatched model or a prefill that pruned nothing."""
    if report is None or report.new_index is None:
        return positions
    pos = report.new_index[b].to(positions.device)[positions]
    if report.output_index is not None:
        pos = report.output_index[b].to(positions.device)[pos]
    if bool((pos < 0).any()):
        raise VTPruneError("a text position was pruned; loglikelihood needs every text token to reach the output")
    return pos


__all__ = ["VTPrune", "MANIFEST",  # noqa: F822 (MANIFEST is built on first access)
           "MODEL_ID", "GenerationFailed", "TaskStats", "load_offline_model", "offline_model_is_trained", "position_in_output"]
