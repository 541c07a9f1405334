"""The noise schedule, as one object the whole project reads: how the teacher noises an image, what its network's
output means, where its timesteps lie and how its deterministic sampler steps, for the two families of teachers
diffusers has (docs/ALGORITHM.md, "Schedules"):

- DDPM (DDPMScheduler, DDIMScheduler, PNDMScheduler, ...: the seed's teachers, SD 1.x/2.x, DiT):
  x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε, the network predicting ε, v = √ᾱ_t ε - √(1-ᾱ_t) x0 or x0 (its `prediction_type`);
- flow matching (FlowMatchEulerDiscreteScheduler: SD3, Flux, SiT): x_t = (1-σ_t) x0 + σ_t ε, the network predicting
  the velocity v = ε - x0 (diffusers' SD3 training target), so x̂0 = x_t - σ_t v̂.

Both are read at integer timesteps t = 0..T-1, noise growing with t, so every draw of t in the project (the DM
loss's, µfake's, the GAN's, the K-step generator's) is the same code for both: a flow teacher's t is the index of
its scheduler's training grid, σ_t = shift·s / (1 + (shift-1)·s) with s = (t+1)/T (so σ_{T-1} = 1, pure noise), and
its network is called with timestep σ_t·T, the scheduler's own `timesteps`.
"""
import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from cli import UserError

# Scheduler classes of the DDPM family: their configs all hold the same β schedule (beta_start, beta_end,
# beta_schedule or trained_betas, num_train_timesteps) and prediction_type, which is what the teacher was trained on.
DDPM_FAMILY = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
               "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
               "HeunDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "LCMScheduler")
FLOW_FAMILY = ("FlowMatchEulerDiscreteScheduler",)


def scheduler_class(name):
    """The diffusers scheduler class a config's `_class_name` names, where this project knows its schedule; else one
    line naming the classes known."""
    if name not in DDPM_FAMILY + FLOW_FAMILY:
        raise UserError(f"the teacher's scheduler is a {name}, whose noise schedule this project does not know: known "
                        f"are the DDPM family ({', '.join(DDPM_FAMILY)}) and flow matching ({', '.join(FLOW_FAMILY)})")
    return getattr(diffusers, name)


def make_schedule(scheduler):
    """The Schedule of a teacher's diffusers scheduler (as loaded from its folder), by its class."""
    name = scheduler_class(type(scheduler).__name__).__name__
    return FlowSchedule(scheduler) if name in FLOW_FAMILY else DDPMSchedule(scheduler)


class Schedule:
    """What both families share. Each subclass gives, at integer t = 0..T-1: coefficients(t) = (a_t, b_t) of
    x_t = a_t x0 + b_t ε (float64, (B, 1, 1, 1)), model_timestep(t) (what the network is called with), to_x0 (x̂0
    from the network's output), target (what the network is trained to output), amplifies_error (where x̂0 magnifies
    the output's error) and sampler(steps) (the deterministic sampler's step on sampling_timesteps(steps))."""
    kind = None  # "ddpm" or "flow"

    def __init__(self, scheduler):
        self.scheduler = scheduler  # the teacher's own, saved beside every student
        self.T = scheduler.config.num_train_timesteps

    def add_noise(self, x0, eps, t):
        """x_t = a_t x0 + b_t ε."""
        a, b = self.coefficients(self.expand(t, x0))
        return (a * x0.double() + b * eps.double()).to(x0.dtype)

    def expand(self, t, x):
        """t (a number or a tensor) as a (B,) long tensor on x's device."""
        return torch.as_tensor(t, device=x.device).long().expand(x.shape[0])

    def sampling_timesteps(self, steps):
        """The `steps` timesteps the deterministic sampler visits, T-1 first, evenly spaced ("trailing" spacing, as
        DDIM's: its first step is at t = T-1, where x_T = z lives)."""
        return [int(t) for t in np.round(np.arange(self.T, 0, -self.T / steps)).astype(np.int64) - 1]


class DDPMSchedule(Schedule):
    kind = "ddpm"

    def __init__(self, scheduler):
        super().__init__(scheduler)
        self.prediction_type = scheduler.config.prediction_type
        # the β schedule of any DDPM-family config, as DDPMScheduler computes it
        self.alphas_cumprod = DDPMScheduler.from_config(scheduler.config).alphas_cumprod.to(torch.float64)

    def coefficients(self, t):
        abar = self.alphas_cumprod.to(t.device)[t].view(-1, 1, 1, 1)
        return abar.sqrt(), (1 - abar).sqrt()

    def model_timestep(self, t):
        return t

    def to_x0(self, x_t, t, out):
        """x̂0 from the output, in float64 (1/√ᾱ_t is up to 158 near t = T-1 on CIFAR-10's schedule), cast back."""
        a, b = self.coefficients(self.expand(t, x_t))
        x_t64, out64 = x_t.double(), out.double()
        if self.prediction_type == "epsilon":
            x0 = (x_t64 - b * out64) / a
        elif self.prediction_type == "v_prediction":
            x0 = a * x_t64 - b * out64
        else:  # "sample"
            x0 = out64
        return x0.to(x_t.dtype)

    def target(self, x0, eps, t):
        """What the network is trained to output at x_t = a x0 + b ε: ε, v = a ε - b x0, or x0."""
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "v_prediction":
            a, b = self.coefficients(self.expand(t, x0))
            return (a * eps.double() - b * x0.double()).to(x0.dtype)
        return x0

    def amplifies_error(self, t):
        """(B,) bool: where x̂0 multiplies the output's error by more than 1 (an ε-teacher at ᾱ_t < 1/2)."""
        if self.prediction_type != "epsilon":
            return torch.zeros_like(t, dtype=torch.bool)
        return self.alphas_cumprod.to(t.device)[t] < 0.5

    def sampler(self, steps):
        """DDIM (eta = 0) on the teacher's schedule with trailing spacing: (the scheduler, its step function). x̂0 is
        clipped to [-1, 1] where the teacher's config says so, and ε̂ recomputed from the clipped x̂0."""
        sched = DDIMScheduler.from_config(self.scheduler.config, timestep_spacing="trailing")
        sched.set_timesteps(steps)
        assert [int(t) for t in sched.timesteps] == self.sampling_timesteps(steps)

        def step(out, i, x):  # use_clipped_model_output: with clip_sample, else guided steps diverge
            return sched.step(out, sched.timesteps[i], x, eta=0.0, use_clipped_model_output=True).prev_sample
        return step


class FlowSchedule(Schedule):
    kind = "flow"
    prediction_type = "flow"  # the velocity v = ε - x0

    def __init__(self, scheduler):
        super().__init__(scheduler)
        c = scheduler.config
        if c.get("use_dynamic_shifting"):
            raise UserError("the teacher's FlowMatchEulerDiscreteScheduler shifts its timesteps by image resolution "
                            "(use_dynamic_shifting, Flux's), which needs a resolution-dependent mu: set "
                            "use_dynamic_shifting false and `shift` to the value for its resolution in "
                            "scheduler_config.json")
        if c.get("invert_sigmas") or c.get("shift_terminal") or c.get("use_karras_sigmas") or \
                c.get("use_exponential_sigmas") or c.get("use_beta_sigmas"):
            raise UserError("the teacher's FlowMatchEulerDiscreteScheduler remaps its sigmas at sampling time "
                            "(invert_sigmas, shift_terminal or karras / exponential / beta sigmas); this project "
                            "samples on the training grid: set those options off in scheduler_config.json")
        self.shift = c.get("shift", 1.0)
        s = torch.arange(1, self.T + 1, dtype=torch.float64) / self.T  # (t+1)/T
        self.sigmas = self.shift * s / (1 + (self.shift - 1) * s)  # = the scheduler's training sigmas, t ascending

    def coefficients(self, t):
        sigma = self.sigmas.to(t.device)[t].view(-1, 1, 1, 1)
        return 1 - sigma, sigma

    def model_timestep(self, t):
        """σ_t·T: the timestep a flow network is trained and sampled with (the scheduler's `timesteps`)."""
        return (self.sigmas.to(t.device)[t] * self.T).float()

    def to_x0(self, x_t, t, out):
        """x̂0 = x_t - σ_t v̂, in float64, cast back."""
        _, sigma = self.coefficients(self.expand(t, x_t))
        return (x_t.double() - sigma * out.double()).to(x_t.dtype)

    def target(self, x0, eps, t):
        return eps - x0

    def amplifies_error(self, t):
        """x̂0 = x_t - σ v̂ never multiplies v̂'s error by more than σ <= 1."""
        return torch.zeros_like(t, dtype=torch.bool)

    def sampler(self, steps):
        """Euler on the probability-flow ODE (FlowMatchEulerDiscreteScheduler, deterministic), on the training grid's
        timesteps of sampling_timesteps (the scheduler shifts the sigmas s = (t+1)/T it is given), down to σ = 0.
        On a flow path, one Euler step from x_t to σ' is DDIM's step: x' = (1-σ') x̂0 + σ' ε̂."""
        config = {k: v for k, v in self.scheduler.config.items() if k != "stochastic_sampling"}
        sched = FlowMatchEulerDiscreteScheduler.from_config(config)
        sched.set_timesteps(sigmas=[(t + 1) / self.T for t in self.sampling_timesteps(steps)])

        def step(out, i, x):
            return sched.step(out, sched.timesteps[i], x).prev_sample.to(x.dtype)
        return step
