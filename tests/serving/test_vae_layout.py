"""Image VAEs load channels-last on the CPU (`loading.vae_channels_last`): same decode, oneDNN's NHWC kernels."""

from __future__ import annotations

import copy

import torch

from stepfleet.serving.loading import vae_channels_last


def test_the_loaded_vae_is_channels_last_and_decodes_as_the_nchw_one(tiny_model):
    vae = tiny_model.pipeline.vae
    conv = vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    nchw = copy.deepcopy(vae).to(memory_format=torch.contiguous_format)
    z = torch.randn(1, vae.config.latent_channels, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = vae.decode(z, return_dict=False)[0], nchw.decode(z, return_dict=False)[0]
    assert float((got - want).abs().max()) <= 1e-4 * float(want.abs().max()) + 1e-5


def test_pipelines_without_an_image_vae_are_left_alone():
    class Pipe:
        vae = torch.nn.Conv3d(2, 2, 3)  # a video VAE's 3-D convolutions have no channels-last layout

    vae_channels_last(Pipe())
    assert Pipe.vae.weight.is_contiguous()
