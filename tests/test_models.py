"""Model loading: the tiny model round-trips through the same loader as the real weights; sizes come from configs."""

from __future__ import annotations

import pytest
import torch

from diffusion.config import ModelConfig
from diffusion.models import (
    ModelLoadError, check_embed_dim, decoder_image_size, load_decoder, load_image_encoder, resolve_dtype,
)
from diffusion.config import DType
from diffusion.demo.tiny import build_tiny_components


def _cfg(path, **kw) -> ModelConfig:
    return ModelConfig(decoder=str(path / "decoder"), prior=str(path / "prior"), device="cpu", **kw)


def test_tiny_model_save_and_load_round_trip(tiny_model):
    built = build_tiny_components(seed=0)
    dec = load_decoder(_cfg(tiny_model))
    enc = load_image_encoder(_cfg(tiny_model))
    check_embed_dim(dec, enc)
    torch.manual_seed(0)
    w = torch.randn(2, 4, 8, 8)
    e = torch.randn(2, 32)
    t = torch.tensor([500, 20])
    ref = built["unet"](w, t, encoder_hidden_states=None, added_cond_kwargs={"image_embeds": e}).sample[:, :4]
    assert torch.allclose(dec.eps(w, t, e), ref, atol=1e-6)
    img = torch.rand(2, 3, 32, 32)
    ref_emb = built["image_encoder"](pixel_values=built["image_processor"](
        images=img, do_rescale=False, return_tensors="pt").pixel_values).image_embeds
    assert torch.allclose(enc.embed(img), ref_emb, atol=1e-6)


def test_sizes_come_from_the_model_configs(tiny_model):
    dec = load_decoder(_cfg(tiny_model))
    enc = load_image_encoder(_cfg(tiny_model))
    assert dec.scale_factor == 2 and dec.latent_channels == 4
    assert dec.image_size == 64 == decoder_image_size(_cfg(tiny_model))
    assert enc.embed_dim == 32
    w0 = dec.encode(torch.rand(1, 3, 64, 64))
    assert w0.shape == (1, 4, 32, 32)
    assert dec.decode(w0).shape == (1, 3, 64, 64)
    assert load_decoder(_cfg(tiny_model, image_size=48)).latent_size == 24


def test_null_embedding_is_the_encoding_of_zero_pixels(tiny_model):
    enc = load_image_encoder(_cfg(tiny_model))
    c0 = enc.null_embedding()
    assert c0.shape == (1, 32)
    direct = enc.model(pixel_values=torch.zeros(1, 3, 32, 32)).image_embeds
    assert torch.allclose(c0, direct)


def test_missing_weights_give_an_actionable_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        load_decoder(ModelConfig(decoder=str(tmp_path / "nowhere"), device="cpu", local_files_only=True))
    msg = str(err.value)
    assert "nowhere" in msg and "make_tiny_model" in msg


def test_dtype_auto_is_fp32_on_cpu():
    assert resolve_dtype(DType.auto, torch.device("cpu")) == torch.float32
    assert resolve_dtype(DType.bfloat16, torch.device("cpu")) == torch.bfloat16
