"""vLLM attention backend over the packed TurboQuant cache.

Four roles, as in vLLM's own backends: :class:`TQMetadata` (per batch),
:class:`TQMetadataBuilder`, :class:`TQAttentionBackend` (static answers: layout,
dtypes, slot bytes) and :class:`TQAttentionImpl` (store + forward). One backend
subclass per preset (:data:`BACKENDS`) so the slot size is known from the class.

What attention reads::

    request:  |<------- context (in cache) ------->|<-- this step's queries -->|
    decode:    all of it from the packed cache (1 query token)
    prefill chunk with context (chunked prefill, prefix-cache hit):
               context and own chunk from the packed cache
    first chunk (no context):
      "strict" (default): the packed cache too, so every token attends to exactly
               what is stored and outputs do not depend on prefix-cache hits,
               chunk sizes or which requests share a batch
      "fast-prefill" (TQ_VLLM_ATTENTION=fast-prefill): the exact fresh K/V, which
               skips decoding the prompt's own slots but makes a prompt's outputs
               differ between a cold run and a prefix-cache hit
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.utils import split_decodes_and_prefills
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from tq_vllm.calibration import LayerTransform, calibrated_codec
from tq_vllm.codec import LayerCodec
from tq_vllm.config import PRESETS, SUPPORTED_HEAD_DIMS, Preset, backend_class_path, backend_enum_name
from tq_vllm.kernels import ops

logger = init_logger(__name__)

MODE_ENV = "TQ_VLLM_ATTENTION"


ATTENTION_MODES = ("strict", "fast-prefill")


def attention_mode() -> str:
    """``strict`` (default) or ``fast-prefill`` from ``TQ_VLLM_ATTENTION``."""
    mode = os.environ.get(MODE_ENV, "strict").strip().lower()
    if mode not in ATTENTION_MODES:
        raise ValueError(f"{MODE_ENV} must be one of {ATTENTION_MODES}, got {mode!r}")
    return mode


@dataclass
class TQMetadata:
    """Per-batch metadata (decodes first, as vLLM reorders them with threshold 1)."""

    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [B + 1]
    seq_lens: torch.Tensor  # [B]
    block_table: torch.Tensor  # [B, max_blocks]
    slot_mapping: torch.Tensor  # [T]
    num_decodes: int
    num_decode_tokens: int
    query_start_loc_cpu: torch.Tensor
    seq_lens_cpu: torch.Tensor


class TQMetadataBuilder(AttentionMetadataBuilder[TQMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self._init_reorder_batch_threshold(1, supports_spec_as_decode=False)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> TQMetadata:
        cam = common_attn_metadata
        num_decodes, _, num_decode_tokens, _ = split_decodes_and_prefills(
            cam, decode_threshold=self.reorder_batch_threshold)
        seq_lens_cpu = getattr(cam, "seq_lens_cpu_upper_bound", None)
        if seq_lens_cpu is None:
            seq_lens_cpu = cam.seq_lens.cpu()
        seq_lens, block_table = cam.seq_lens, cam.block_table_tensor
        if block_table.device.type == "cpu":  # the CPU kernels' index type, once per step
            seq_lens, block_table = seq_lens.to(torch.int64), block_table.to(torch.int64)
        return TQMetadata(
            num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
            max_seq_len=cam.max_seq_len, query_start_loc=cam.query_start_loc,
            seq_lens=seq_lens, block_table=block_table,
            slot_mapping=cam.slot_mapping, num_decodes=num_decodes,
            num_decode_tokens=num_decode_tokens, query_start_loc_cpu=cam.query_start_loc_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )


class TQAttentionBackend(AttentionBackend):
    """Static answers for one preset (subclassed per preset in :data:`BACKENDS`)."""

    preset: ClassVar[Preset]
    accept_output_buffer: bool = True
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = list(PRESETS)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """Pack K+V of one token and KV head into one ``slot_bytes`` uint8 cell."""
        if spec.state_content_bytes is not None or spec.dtype != torch.uint8:
            return spec
        return replace(spec, state_content_bytes=cls.preset.layout(spec.head_size).slot_bytes)

    @classmethod
    def get_name(cls) -> str:
        return backend_enum_name(cls.preset.name)

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        # head-major block interiors, the layout CPU_ATTN (exact boundary layers) needs too
        return (KVCacheLayout.LBHNC,)

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        return kv_cache_dtype == cls.preset.name

    @staticmethod
    def get_impl_cls() -> type["TQAttentionImpl"]:
        return TQAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[TQMetadataBuilder]:
        return TQMetadataBuilder


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"tq-vllm KV cache does not support {what}; use --kv-cache-dtype auto or fp8 for "
        "this model, or list the affected layers in --kv-cache-dtype-skip-layers."
    )


class TQAttentionImpl(AttentionImpl):
    """Stores K/V into packed slots and attends over them."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **extra) -> None:
        if attn_type != AttentionType.DECODER:
            raise _unsupported(f"{attn_type} attention")
        if alibi_slopes is not None:
            raise _unsupported("ALiBi")
        if sliding_window is not None:
            raise _unsupported("sliding-window layers")
        if logits_soft_cap:
            raise _unsupported("logit soft-capping")
        if sinks is not None:
            raise _unsupported("attention sinks")
        if head_size not in SUPPORTED_HEAD_DIMS:
            raise _unsupported(f"head_size {head_size} (supported: {SUPPORTED_HEAD_DIMS})")
        self.preset = PRESETS[kv_cache_dtype]
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.kv_cache_dtype = kv_cache_dtype
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.fresh_exact = attention_mode() == "fast-prefill"
        self.model_path = None
        if self.preset.transform.needs_calibration:  # at start-up: errors and the one-off
            self.model_path = _current_model_path()  # calibration happen before serving
            _model_stats(self.model_path)
        self._codec: LayerCodec | None = None
        self._transform = LayerTransform()

    def codec(self, layer: torch.nn.Module, device: torch.device) -> LayerCodec:
        """This layer's seeded codec and calibrated transform (built once, on first use)."""
        if self._codec is None:
            idx = extract_layer_index(getattr(layer, "layer_name", "layers.0"))
            if self.model_path is not None:
                codec, tf = _calibrated(self.preset, self.model_path, idx, self.head_size,
                                        self.num_kv_heads)
                self._transform = tf.to(device)
            else:
                codec = LayerCodec.create(self.preset, self.head_size, self.num_kv_heads,
                                          layer=idx)
            self._codec = codec.to(device)
        return self._codec

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        n = slot_mapping.shape[0]
        if n == 0:
            return
        k = _first_rows(key, n).view(n, self.num_kv_heads, self.head_size)
        v = _first_rows(value, n).view(n, self.num_kv_heads, self.head_size)
        ops.store(k, v, kv_cache, slot_mapping, self.codec(layer, key.device),
                  transform=self._transform)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: TQMetadata | None,
                output: torch.Tensor | None = None, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise _unsupported("fused output quantization")
        if output is None:
            output = torch.empty(query.shape[0], self.num_heads * self.head_size,
                                 dtype=query.dtype, device=query.device)
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        m = attn_metadata
        n = m.num_actual_tokens
        out = _first_rows(output, n).view(n, self.num_heads, self.head_size)
        codec = self.codec(layer, query.device)
        tf = self._transform
        query = _first_rows(query, n).view(n, self.num_heads, self.head_size)
        nd, ndt = m.num_decodes, m.num_decode_tokens
        if nd:  # the kernels apply the query transform (on the CPU, fused: no copies)
            ops.decode(_first_rows(query, ndt), kv_cache, _first_rows(m.block_table, nd),
                       _first_rows(m.seq_lens, nd), codec, self.scale, out=_first_rows(out, ndt),
                       transform=tf)
        if ndt < n:
            q = tf.queries(query)
            k = tf.keys(key[:n].view(n, self.num_kv_heads, self.head_size))
            v = tf.values(value[:n].view(n, self.num_kv_heads, self.head_size))
            ops.prefill(q, k, v, kv_cache, m.block_table, m.seq_lens_cpu,
                        m.query_start_loc_cpu, nd, codec, self.scale, out,
                        fresh_exact=self.fresh_exact)
        tf.restore_output(out)
        return output


def _first_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x[:n]``, without the slicing op when ``x`` has exactly ``n`` rows: each PyTorch op
    between the model's GEMMs costs microseconds on a CPU, and a decode step calls these
    for every layer."""
    return x if x.shape[0] == n else x[:n]


def _current_model_path() -> str:
    """The served model's path, from the vLLM config being built (calibration source)."""
    from vllm.config import get_current_vllm_config

    return get_current_vllm_config().model_config.model


def _model_stats(model_path: str) -> dict:
    """The served model's cached calibration (computed on first use, logged)."""
    from tq_vllm.tools.calibrate import calibration_path, model_calibration

    path = calibration_path(model_path)
    if not path.exists():
        logger.info("tq-vllm: calibrating %s for the recommended presets (once) → %s",
                    model_path, path)
    return model_calibration(model_path)


def _calibrated(preset: Preset, model_path: str, layer: int, head_size: int, num_kv_heads: int):
    """(codec, transform) of ``layer`` for this rank's ``num_kv_heads`` KV heads, from the
    model's cached calibration (which covers all of the model's heads)."""
    stats = _model_stats(model_path)
    if layer not in stats:
        raise RuntimeError(f"tq-vllm calibration of {model_path} has no layer {layer}")
    heads = local_kv_heads(int(stats[layer].k_mean.shape[0]), num_kv_heads)
    return calibrated_codec(preset, stats[layer].heads(heads), head_size, layer)


def local_kv_heads(total: int, local: int) -> torch.Tensor:
    """Indices ``[local]`` of this tensor-parallel rank's KV heads among the model's
    ``total``: vLLM gives rank r heads ``[r·local, (r+1)·local)``, or, with fewer KV heads
    than ranks, one head replicated over ``tp / total`` consecutive ranks."""
    if local == total:
        return torch.arange(total)
    from vllm.distributed import (get_tensor_model_parallel_rank,
                                  get_tensor_model_parallel_world_size)

    rank, tp = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    if tp >= total and local == 1 and tp % total == 0:
        return torch.tensor([rank // (tp // total)])
    if local * tp == total:
        return torch.arange(rank * local, (rank + 1) * local)
    raise RuntimeError(f"tq-vllm: cannot map {local} local KV heads of {total} onto tensor-"
                       f"parallel rank {rank} of {tp}")


def _make_backends() -> dict[str, type[TQAttentionBackend]]:
    out = {}
    for name, preset in PRESETS.items():
        cls_name = backend_class_path(name).rsplit(".", 1)[1]
        out[name] = type(cls_name, (TQAttentionBackend,), {"preset": preset, "__module__": __name__})
        globals()[cls_name] = out[name]
    return out


BACKENDS: dict[str, type[TQAttentionBackend]] = _make_backends()
