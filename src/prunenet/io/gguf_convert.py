"""A GGUF model as a safetensors checkpoint, converted one tensor at a time.

transformers loads a GGUF by dequantizing every tensor into one dict before the model sees any
of them (float32: 4 bytes a parameter, about twice that at the peak), so a GGUF larger than
memory cannot be loaded at all. :func:`convert_gguf` runs the same steps (gguf's
dequantization, transformers' per-architecture tensor processing and name mapping, float32)
tensor by tensor and writes each decoder layer's tensors as one safetensors shard, so that it
holds one layer at a time; the checkpoint it writes is then streamed like any other
(``--max-memory``), and equals what transformers loads from the GGUF, tensor for tensor.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import InputError
from ..model_view import check_finite
from .files import atomic_folder
from .loading import (
    CARD_NAME,
    CONVERTED_MARKER,
    gguf_license,
    gguf_parameters,
    gguf_reader,
    is_conversion,
    load_config,
    load_tokenizer,
    resolve_source,
    validate_gguf,
    write_text_atomic,
)
from .model_card import conversion_card
from .streaming import check_disk_space

log = logging.getLogger(__name__)
INDEX_NAME = "model.safetensors.index.json"
_LAYER = re.compile(r"\.(\d+)\.")


def _processed(path: Path, config: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """(transformers name, float32 tensor) for every tensor of the GGUF at ``path``, in the
    file's order, as transformers' GGUF loader computes them."""
    from gguf import dequantize
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TENSOR_PROCESSORS,
        TensorProcessor,
        get_gguf_hf_weights_map,
        load_gguf_checkpoint,
        read_field,
    )

    reader = gguf_reader(path)
    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=parsed["config"])
    with torch.device("meta"):  # the names only
        names = get_gguf_hf_weights_map(AutoModelForCausalLM.from_config(config), processor)
    parsed["tensors"] = {}  # where some processors put a tensor under its final name
    with open(path, "rb") as handle:
        for tensor in reader.tensors:
            # Read, not memory-mapped: pages of a mapping stay resident (and counted) until
            # the whole file is unmapped, which would hold the model after all.
            handle.seek(tensor.data_offset)
            raw = np.fromfile(handle, dtype=tensor.data.dtype, count=tensor.data.size)
            result = processor.process(
                weights=dequantize(raw.reshape(tensor.data.shape), tensor.tensor_type),
                name=tensor.name, tensor_key_mapping=names, parsed_parameters=parsed)
            del raw
            yield from parsed["tensors"].items()
            parsed["tensors"].clear()
            if result.name in names:
                yield names[result.name], torch.from_numpy(np.copy(result.weights)).float()


def convert_gguf(source: str | Path, out: str | Path, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Write the GGUF model ``source`` to ``out`` as a float32 safetensors checkpoint (one
    shard per decoder layer, an index, config.json, the tokenizer where transformers builds
    one from the GGUF, as loading it does), one layer in memory at a time, atomically.
    Raises :class:`InputError` for a source that is not a readable GGUF,
    :class:`NumericalError` for one whose weights hold NaN or Inf, and
    :class:`OutputError` when the disk cannot hold the result
    (:func:`~prunenet.io.streaming.check_disk_space`)."""
    folder, gguf_file = resolve_source(source)
    if gguf_file is None:
        raise InputError(f"{source} is not a GGUF file; only a .gguf model is converted")
    path = Path(folder) / gguf_file
    validate_gguf(path)
    config = load_config(path)
    out = Path(out).expanduser().resolve()
    check_disk_space(out, 4 * gguf_parameters(path))  # float32
    from transformers import GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    with atomic_folder(out, overwrite, ours=is_conversion) as staging:
        weight_map: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        group = None
        total = 0

        def flush() -> None:
            name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
            save_file(shard, staging / name, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()

        tensors = tqdm(_processed(path, config), desc="converting", unit=" tensors",
                       disable=not progress)
        for name, tensor in tensors:
            # a NaN or Inf dequantized is saved by no output (compress refuses the result)
            check_finite(f"{path}: {name}", tensor, "is not converted; nothing was written")
            layer = _LAYER.search(name)
            key = layer.group(1) if layer else None
            if shard and key != group:
                flush()
            group = key
            shard[name] = tensor
            total += tensor.numel() * tensor.element_size()
        if shard:
            flush()
        (staging / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        config.dtype = torch.float32
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.save_pretrained(staging)
        GenerationConfig.from_model_config(config).save_pretrained(staging)
        tokenizer = load_tokenizer(path)  # None, as the load has it, where none can be built
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        write_text_atomic(staging / CARD_NAME, conversion_card(gguf_file, gguf_license(path)))
        (staging / CONVERTED_MARKER).write_text(gguf_file + "\n")
    return out
