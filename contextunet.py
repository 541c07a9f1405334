"""ContextUnet: the MNIST teacher's backbone (the architecture of TeaPearce/Conditional_Diffusion_MNIST), written
as a diffusers model (ModelMixin + ConfigMixin), so it saves and loads with save_pretrained / from_pretrained.

This file imports only torch and diffusers: an exported MNIST student carries a copy of it in its pipeline folder
(`unet/contextunet.py`), so `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` needs nothing else.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.unets.unet_2d import UNet2DOutput


class ResidualConvBlock(nn.Module):
    def __init__(self, c_in, c_out, is_res=False):
        super().__init__()
        self.is_res, self.same_channels = is_res, c_in == c_out
        self.conv1 = nn.Sequential(nn.Conv2d(c_in, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())
        self.conv2 = nn.Sequential(nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.GELU())

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = self.conv2(x1)
        if not self.is_res:
            return x2
        return ((x if self.same_channels else x1) + x2) / 1.414  # keeps the variance of a sum of two


class UnetDown(nn.Sequential):
    def __init__(self, c_in, c_out):
        super().__init__(ResidualConvBlock(c_in, c_out), nn.MaxPool2d(2))


class UnetUp(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.model = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, 2),
                                   ResidualConvBlock(c_out, c_out), ResidualConvBlock(c_out, c_out))

    def forward(self, x, skip):
        return self.model(torch.cat((x, skip), 1))


def embed_fc(d_in, d_out):
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class ContextUnet(ModelMixin, ConfigMixin):
    """28x28 class-conditional U-Net: 28 -> 14 -> 7 -> 7x7 average-pool bottleneck and back.

    Time t/T and the one-hot class go through small MLPs; the class embedding scales and the time
    embedding shifts the up-path features. Label `n_classes` is the "null" label of classifier-free
    guidance: its one-hot row is all zeros. `num_class_embeds` and `return_dict` are what diffusers pipelines read
    from a UNet: num_class_embeds = n_classes, the real classes only, because a pipeline called without class labels
    draws them from range(num_class_embeds) and must not draw the null label (still accepted by forward).
    """

    @register_to_config
    def __init__(self, in_channels=1, n_feat=128, n_classes=10, sample_size=28, num_train_timesteps=400,
                 num_class_embeds=None):
        super().__init__()
        self.register_to_config(num_class_embeds=n_classes)  # folders saved before said n_classes + 1
        n = n_feat
        self.init_conv = ResidualConvBlock(in_channels, n, is_res=True)
        self.down1 = UnetDown(n, n)
        self.down2 = UnetDown(n, 2 * n)
        self.to_vec = nn.Sequential(nn.AvgPool2d(sample_size // 4), nn.GELU())
        self.timeembed1, self.timeembed2 = embed_fc(1, 2 * n), embed_fc(1, n)
        self.contextembed1, self.contextembed2 = embed_fc(n_classes, 2 * n), embed_fc(n_classes, n)
        self.up0 = nn.Sequential(nn.ConvTranspose2d(2 * n, 2 * n, sample_size // 4, sample_size // 4),
                                 nn.GroupNorm(8, 2 * n), nn.ReLU())
        self.up1 = UnetUp(4 * n, n)
        self.up2 = UnetUp(2 * n, n)
        self.out = nn.Sequential(nn.Conv2d(2 * n, n, 3, 1, 1), nn.GroupNorm(8, n), nn.ReLU(),
                                 nn.Conv2d(n, in_channels, 3, 1, 1))

    def forward(self, sample, timestep, class_labels=None, return_dict=True):
        B, n = sample.shape[0], self.config.n_feat
        x, down1, down2, c, t, h = self._down_and_bottleneck(sample, timestep, class_labels)
        up2 = self.up1(h, down2)
        up3 = self.up2(self.contextembed2(c).view(B, n, 1, 1) * up2 + self.timeembed2(t).view(B, n, 1, 1), down1)
        out = self.out(torch.cat((up3, x), 1))
        return UNet2DOutput(sample=out) if return_dict else (out,)

    def bottleneck(self, sample, timestep, class_labels=None):
        """The 7x7 bottleneck (B, 2 n_feat, 7, 7) after the class embedding has scaled it and the time embedding has
        shifted it: the first features that know x_t, t and y (DMD2's GAN head reads them). They are made from the
        down path average-pooled to one vector per image (`to_vec`), so they keep no spatial layout of x_t."""
        return self._down_and_bottleneck(sample, timestep, class_labels)[-1]

    def up_features(self, sample, timestep, class_labels=None):
        """The first up block's output (B, n_feat, 14, 14): the bottleneck (x_t, t, y) joined with the down path's
        7x7 map, so these features know t and y and keep the image's spatial layout."""
        x, down1, down2, c, t, h = self._down_and_bottleneck(sample, timestep, class_labels)
        return self.up1(h, down2)

    def _down_and_bottleneck(self, sample, timestep, class_labels):
        B, n = sample.shape[0], self.config.n_feat
        if class_labels is None:  # unconditional = the null label
            class_labels = torch.full((B,), self.config.n_classes, device=sample.device)
        c = F.one_hot(class_labels.long(), self.config.n_classes + 1)[:, :-1].to(sample.dtype)
        t = torch.as_tensor(timestep, device=sample.device).expand(B).to(sample.dtype)
        t = (t / self.config.num_train_timesteps)[:, None]
        x, down1, down2 = self.encode(sample)
        up1 = self.up0(self.to_vec(down2))
        h = self.contextembed1(c).view(B, 2 * n, 1, 1) * up1 + self.timeembed1(t).view(B, 2 * n, 1, 1)
        return x, down1, down2, c, t, h

    def encode(self, sample):
        """The down path: (x 28x28, down1 14x14, down2 7x7). It sees neither t nor the class: both enter on the way
        up."""
        x = self.init_conv(sample)
        down1 = self.down1(x)
        return x, down1, self.down2(down1)

