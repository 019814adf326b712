"""What the SD path trains, and nothing else: LoRA adapters and the embedding rows of new class tokens.

New tokens are added to the tokenizer, and the text encoder's embedding matrix grows to hold them, but the matrix
itself stays frozen: a small fp32 parameter (one row per new token) is spliced into the embedding layer's output
wherever a new token id appears. So no other row can change by construction, the optimiser holds state for a few
rows instead of 49,408, and the same rows are what we save.

Files are diffusers' own formats, loadable without dermsynth:
``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(folder)``) and ``embeddings/<class>.safetensors``
holding ``{token: vector}`` (``pipe.load_textual_inversion(file)``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dermsynth.config import ConfigError

LORA_FILE = "pytorch_lora_weights.safetensors"
EMBEDDINGS_DIR = "embeddings"
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


class TokenRows(nn.Module):
    """Trainable embedding rows for ``ids``, spliced into a frozen embedding layer's output by a forward hook."""

    def __init__(self, ids: list[int], init: torch.Tensor):
        super().__init__()
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.weight = nn.Parameter(init.detach().float().clone())

    def splice(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        match = args[0].unsqueeze(-1) == self.ids.to(args[0].device)  # (B, L, n_tokens)
        hit = match.any(-1, keepdim=True)
        rows = self.weight[match.int().argmax(-1)].to(output.dtype)
        return torch.where(hit, rows, output)


def add_tokens(tokenizer: Any, text_encoder: Any, tokens: list[str], init_words: list[str]) -> TokenRows:
    """Register ``tokens`` (one per class), grow the embedding matrix, and hook in trainable rows that start at the
    mean embedding of each init word."""
    emb = text_encoder.get_input_embeddings()
    init = []
    for token, word in zip(tokens, init_words):
        word_ids = tokenizer(word, add_special_tokens=False).input_ids
        if not word_ids:
            raise ConfigError(f"init word {word!r} for token {token!r} encodes to no tokens")
        init.append(emb.weight[torch.tensor(word_ids)].float().mean(0))
    for token in tokens:
        if tokenizer.add_tokens(token) != 1:
            raise ConfigError(f"token {token!r} already exists in the tokenizer; choose a new one (sd.tokens)")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the new rows are never read
    rows = TokenRows(tokenizer.convert_tokens_to_ids(tokens), torch.stack(init)).to(emb.weight.device)
    text_encoder.get_input_embeddings().register_forward_hook(rows.splice)
    return rows


def add_lora(unet: Any, text_encoder: Any, rank: int, alpha: float, targets: list[str], text_lora: bool) -> None:
    """peft LoRA on the UNet attention projections (and optionally the CLIP attention); adapters in fp32."""
    from peft import LoraConfig, inject_adapter_in_model

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    if text_lora:
        # peft directly rather than transformers' add_adapter, which some transformers/peft pairs refuse
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                                           target_modules=TEXT_TARGETS), text_encoder)
    for model in (unet, text_encoder):
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()  # trainable parameters in fp32 whatever the frozen weights' dtype


def trainable(unet: Any, text_encoder: Any, rows: TokenRows) -> dict[str, list[nn.Parameter]]:
    """The three parameter groups, in a fixed order (the optimiser state is keyed by that order)."""
    return {
        "unet_lora": [p for _, p in unet.named_parameters() if p.requires_grad],
        "tokens": [rows.weight],
        "text_lora": [p for _, p in text_encoder.named_parameters() if p.requires_grad],
    }


def save_adapters(folder: str | Path, unet: Any, text_encoder: Any, rows: TokenRows, tokens: dict[str, str]) -> None:
    """Write the LoRA file and one textual-inversion file per class into ``folder`` (which must be private until
    complete: callers write into a temp folder and rename it)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder = Path(folder)
    text_layers = text_meta = None
    if getattr(text_encoder, "peft_config", None):
        text_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        text_meta = text_encoder.peft_config["default"].to_dict()
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
        text_encoder_lora_layers=text_layers, weight_name=LORA_FILE, safe_serialization=True,
        # the metadata carries lora_alpha: without it diffusers would load the adapters at scale 1
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(), text_encoder_lora_adapter_metadata=text_meta)
    (folder / EMBEDDINGS_DIR).mkdir(exist_ok=True)
    for k, (cls, token) in enumerate(tokens.items()):
        vector = rows.weight[k].detach().float().cpu().clone()
        save_file({token: vector}, str(folder / EMBEDDINGS_DIR / f"{cls}.safetensors"))


def embedding_files(folder: str | Path, classes: list[str]) -> list[Path]:
    return [Path(folder) / EMBEDDINGS_DIR / f"{c}.safetensors" for c in classes]


def load_adapters(folder: str | Path, unet: Any, text_encoder: Any, rows: TokenRows, tokens: dict[str, str]) -> None:
    """Inverse of :func:`save_adapters` into a model that already has adapters and token rows (resuming)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.training_utils import _set_state_dict_into_text_encoder
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    state, _ = StableDiffusionPipeline.lora_state_dict(folder, weight_name=LORA_FILE)
    unet_state = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()
                                                  if k.startswith("unet.")})
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{folder / LORA_FILE}: keys that fit no UNet adapter: {result.unexpected_keys[:3]}")
    if any(k.startswith("text_encoder.") for k in state):
        _set_state_dict_into_text_encoder(state, prefix="text_encoder.", text_encoder=text_encoder)
    with torch.no_grad():
        for k, (cls, token) in enumerate(tokens.items()):
            saved = load_file(str(Path(folder) / EMBEDDINGS_DIR / f"{cls}.safetensors"))
            rows.weight[k].copy_(saved[token])
