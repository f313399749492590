"""The engine-side model: vLLM's Qwen2 decoder fed with the rows the processor selected.

There is no vision tower here: the ViT and the QTS+ selector run in the API-server process
(``processor.py``), so ``embed_multimodal`` only hands back the precomputed rows, and
``load_weights`` skips the vision, selector and projector tensors. Positions are plain sequential
(DESIGN §2.8): the checkpoint's config declares M-RoPE, and M-RoPE with three equal axes is
ordinary 1-D RoPE, so every axis gets 0..S-1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import SupportsMRoPE, SupportsMultiModal, SupportsPP
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    init_vllm_registered_model,
    maybe_prefix,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..checkpoint import validate_checkpoint
from ..config import PROJECTOR_KEY, VISION_PREFIX
from ..layout import peft_error, peft_tensors
from .processor import (
    PASSTHROUGH_FIELDS,
    PLACEHOLDERS,
    SELECTED_FIELDS,
    QTSplusDummyInputsBuilder,
    QTSplusMultiModalProcessor,
    QTSplusProcessingInfo,
)

# Tensors the processor's runtime owns; the engine never loads them.
_PROCESSOR_ONLY = (VISION_PREFIX, "model.qts_plus.", PROJECTOR_KEY)


class _StreamedShapes:
    """The shapes of the tensors that streamed past ``load_weights``, readable like a checkpoint's."""

    def __init__(self) -> None:
        self.all: dict[str, list[int]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self.all

    def shapes(self, prefix: str = "", strip: bool = True) -> dict[str, list[int]]:
        cut = len(prefix) if strip else 0
        return {k[cut:]: v for k, v in self.all.items() if k.startswith(prefix)}


def _rows(value: object) -> list[torch.Tensor]:
    """Per-item [n_i, D] tensors from a batched field (a list, or one stacked [B, n, D] tensor)."""
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0)) if value.ndim == 3 else [value]
    return [row for item in value for row in _rows(item)]


@MULTIMODAL_REGISTRY.register_processor(
    QTSplusMultiModalProcessor, info=QTSplusProcessingInfo, dummy_inputs=QTSplusDummyInputsBuilder
)
class QTSplusQwen2_5_VLForCausalLM(nn.Module, SupportsMultiModal, SupportsMRoPE, SupportsPP):
    """``QTSplusQwen2_5_VLTextForCausalLM`` checkpoints: a Qwen2 LM over text + selected video rows."""

    # The processor normalises pixels itself (DESIGN §9, trap 8).
    supports_mm_device_do_normalize = False

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={"lm_head.": "language_model.lm_head.", "model.": "language_model.model."}
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        for name, placeholder in PLACEHOLDERS.items():
            if modality.startswith(name):
                return placeholder
        raise ValueError(f"QTSplus models take videos and images, not {modality!r}")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        self.config = vllm_config.model_config.hf_config
        self.model_path = vllm_config.model_config.model
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                prefix=maybe_prefix(prefix, "language_model"),
                architectures=["Qwen2ForCausalLM"],
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        """The processor's rows, one [n_i, D] tensor per item in prompt order.

        vLLM batches items of one modality with the same fields per call, so exactly one of the
        fields below is present.
        """
        fields = [*SELECTED_FIELDS.values(), *PASSTHROUGH_FIELDS.values()]
        return [rows for name in fields for rows in _rows(kwargs.get(name))]

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        """Sequential positions on all three M-RoPE axes; no offset for later tokens."""
        return torch.arange(len(input_tokens)).expand(3, -1).clone(), 0

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors=None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ):
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(
            input_ids=input_ids,
            positions=positions,
            intermediate_tensors=intermediate_tensors,
            inputs_embeds=inputs_embeds,
        )

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load the LM; check (by shape, at start-up) the ViT and selector tensors the API server will load.

        The engine reads every tensor of the checkpoint anyway: a missing or misshapen vision or
        selector tensor stops the server here instead of failing each request later.
        """
        processor_only = _StreamedShapes()

        def lm_weights():
            for name, weight in weights:
                if peft_tensors([name]):  # before vLLM's loader stops on a name it does not know
                    raise peft_error([name], f"the checkpoint {self.model_path}")
                if name.startswith(_PROCESSOR_ONLY):
                    processor_only.all[name] = list(weight.shape)
                else:
                    yield name, weight

        loaded = AutoWeightsLoader(self).load_weights(lm_weights(), mapper=self.hf_to_vllm_mapper)
        validate_checkpoint(self.config, processor_only)
        return loaded
