"""GeneratorPipeline: a distilled 1- or K-step generator as a diffusers pipeline, for the students no diffusers
pipeline class runs as they were trained: flow-matching ones (a FlowMatchEulerDiscreteScheduler and no VAE) and
latent ones (a VAE that decodes the latents, with class labels and per-sample generators at 1 or K steps).

This file imports only torch, numpy and diffusers: a student's pipeline folder carries a copy of it, which
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` finds through model_index.json and runs:

    pipe(batch_size=4, class_labels=[0, 1, 2, 3], num_inference_steps=1,
         generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
"""
import numpy as np
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class GeneratorPipeline(DiffusionPipeline):
    """The generator (`unet`: a UNet2DModel or a custom UNet; or `transformer`: a DiTTransformer2DModel, as DiTPipeline
    names it), the `scheduler` that runs its steps, and a latent student's `vae` (None for pixels).

    Each step is one network evaluation at the scheduler's timestep, then the scheduler's step: the last one returns
    x̂0, the others re-noise it to the next timestep with fresh noise drawn from `generator` (LCMScheduler; a flow
    scheduler with stochastic_sampling), as the student was trained (DMD2's K-step generator)."""
    _optional_components = ["unet", "transformer", "vae"]

    def __init__(self, scheduler, unet=None, transformer=None, vae=None):
        super().__init__()
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae)

    @torch.no_grad()
    def __call__(self, batch_size=1, class_labels=None, num_inference_steps=1, generator=None, output_type="pil",
                 return_dict=True):
        dit = self.transformer is not None
        net = self.transformer if dit else self.unet
        c, device = net.config, self._execution_device
        x = randn_tensor((batch_size, c.in_channels, c.sample_size, c.sample_size), generator=generator, device=device,
                         dtype=net.dtype)
        classes = c.num_embeds_ada_norm if dit else c.get("num_class_embeds")  # the real classes (no null label)
        if classes and classes > 1:
            labels = (torch.randint(0, classes, (batch_size,)) if class_labels is None
                      else torch.as_tensor(class_labels).reshape(-1)).to(device)
        else:  # unconditional (a DiT has one class)
            labels = torch.zeros(batch_size, dtype=torch.long, device=device) if dit else None
        K = num_inference_steps
        if isinstance(self.scheduler, FlowMatchEulerDiscreteScheduler):
            # the generator's timesteps t_k = (K - k) T / K - 1 are sigmas shift(s_k), s_k = (K - k) / K (the scheduler
            # shifts the s it is given); its own default grid for K steps would end at 1/T instead of 1/K
            self.scheduler.set_timesteps(sigmas=np.linspace(1, 1 / K, K))
        else:
            self.scheduler.set_timesteps(K)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = self.scheduler.scale_model_input(x, t) if hasattr(self.scheduler, "scale_model_input") else x
            out = net(model_input, t.to(device).expand(batch_size), class_labels=labels).sample
            out = out[:, :c.in_channels]  # a DiT's learned-σ half, where it has one, is not the prediction
            x = self.scheduler.step(out, t, x, generator=generator).prev_sample
        if self.vae is not None:  # latents -> images, SD's convention (and Flux's shift)
            x = self.vae.decode(x / self.vae.config.scaling_factor + (self.vae.config.get("shift_factor") or 0)).sample
        images = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
