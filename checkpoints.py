"""Teachers and students on disk: loading a teacher (a model folder, a pipeline folder or a hub id), saving teachers,
students and the student's diffusers pipeline with its model card, and the weights hash that names a teacher.

A teacher is one folder holding `config.json` + `diffusion_pytorch_model.safetensors` (the backbone) and
`scheduler_config.json` (its DDPM noise schedule) - the same flat layout as the hub's google/ddpm-cifar10-32.
"""
import hashlib
import os
import shutil

from diffusers import (AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                       UNet2DConditionModel, UNet2DModel)
from huggingface_hub import HfApi, ModelCardData, try_to_load_from_cache
from huggingface_hub.errors import RepositoryNotFoundError

import contextunet
import pipeline_generator
from cli import UserError
from contextunet import ContextUnet
from models import BACKBONES, Denoiser, TextEncoder, check_guidance, class_labels_of
from files import TEACHER, atomic, load_json, save_folder, write_json
from recipes import PRESETS, default_guidance
from schedules import scheduler_class

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GENERATOR_CONFIG = "generator.json"  # in a student's folder: the timesteps of its K steps
UNET_CODE = f"{ContextUnet.__module__}.py"  # a ContextUnet's code, in an exported unet/: model_index.json names it
PIPELINE_CODE = f"{pipeline_generator.__name__}.py"  # a flow or latent student's pipeline code, in its folder


def save_teacher(backbone, scheduler, folder, vae=None, text=None):
    """Diffusers layout (backbone + scheduler in one folder, a latent teacher's AutoencoderKL in vae/, a text-to-image
    teacher's text encoder and tokenizer in text_encoder/ and tokenizer/, as SD's, SDXL's second pair in
    text_encoder_2/ and tokenizer_2/), every file renamed into place whole."""
    save_folder(folder, backbone, scheduler)
    if text is not None:
        save_folder(os.path.join(folder, "text_encoder"), text.model)
        save_folder(os.path.join(folder, "tokenizer"), text.tokenizer)
    if text is not None and text.model_2 is not None:
        save_folder(os.path.join(folder, "text_encoder_2"), text.model_2)
        save_folder(os.path.join(folder, "tokenizer_2"), text.tokenizer_2)
    if vae is not None:
        save_folder(os.path.join(folder, "vae"), vae)


def save_student(backbone, scheduler, folder, timesteps, vae=None, text=None):
    """A student: the teacher's folder layout (with its VAE and text encoder: the folder makes images on its own) plus
    generator.json, the generator's timesteps (K = their number), so that sampling, evaluation and the pipeline export
    run it at the timesteps it was trained for."""
    save_teacher(backbone, scheduler, folder, vae, text)
    write_json(dict(timesteps=[int(t) for t in timesteps]), os.path.join(folder, GENERATOR_CONFIG))


def save_pipeline(backbone, scheduler, folder, timesteps, config, vae=None, text=None):
    """The student as a diffusers pipeline that `DiffusionPipeline.from_pretrained(folder)` loads with diffusers and
    torch alone, from any folder, with a scheduler that runs the student at its timesteps (`config`, distill.py's,
    goes into the model card).
    - A pixel DDPM student: ConsistencyModelPipeline, diffusers' few-step generator pipeline that passes class labels
      to its UNet. One step: DDIM with trailing spacing (its one step is t = T-1 and returns x̂0). K steps: LCM,
      whose multistep sampling re-noises x̂0 with fresh noise exactly as sampling.sample_generator does (its
      timesteps are generator_timesteps'; intermediate x̂0 are not clipped, as here).
    - A flow or latent student (`vae`): no diffusers pipeline takes a flow scheduler without a VAE, nor a VAE with
      per-sample generators and class labels at 1 or K steps, so pipeline_generator.py's GeneratorPipeline travels
      in the folder (diffusers' way for a custom pipeline; components unet/ or transformer/ as DiTPipeline names
      them, scheduler/, vae/). Flow: FlowMatchEulerDiscreteScheduler, stochastic at K > 1 (x̂0 re-noised with fresh
      noise, DMD2's K-step sampling); DDPM: DDIM / LCM as above.
    - A text-to-image student (`text`): StableDiffusionPipeline (StableDiffusionXLPipeline for SDXL's two encoders),
      the student's UNet with the teacher's VAE, text encoder(s) and tokenizer(s) and the DDIM / LCM scheduler above:
      pipe(prompt, num_inference_steps=K, guidance_scale=1.0) (its guidance was distilled into it: the pipeline must
      not guide again).
    Code that is no diffusers class (a ContextUnet, the GeneratorPipeline) runs only with trust_remote_code=True."""
    from diffusers import ConsistencyModelPipeline, DDIMScheduler, FlowMatchEulerDiscreteScheduler, LCMScheduler
    K, flow = len(timesteps), isinstance(scheduler, FlowMatchEulerDiscreteScheduler)
    if flow:
        sched = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, stochastic_sampling=K > 1)
    elif K == 1:
        sched = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    else:
        sched = LCMScheduler.from_config(scheduler.config, original_inference_steps=K, clip_sample=False)
    net = real_classes_only(backbone)
    if text is not None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
        sched = type(sched).from_config(sched.config, steps_offset=1)  # what StableDiffusionPipeline rewrites it to,
        # with a warning; trailing DDIM's and LCM's timesteps do not read it
        parts = dict(vae=vae, text_encoder=text.model, tokenizer=text.tokenizer, unet=net, scheduler=sched)
        save_folder(folder, StableDiffusionXLPipeline(**parts, text_encoder_2=text.model_2, tokenizer_2=text.tokenizer_2,
                                                      force_zeros_for_empty_prompt=text.zero_null)
                    if text.model_2 is not None else
                    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False))
    elif flow or vae is not None:
        name = "transformer" if isinstance(backbone, DiTTransformer2DModel) else "unet"
        save_folder(folder, pipeline_generator.GeneratorPipeline(scheduler=sched, vae=vae, **{name: net}))
        with atomic(os.path.join(folder, PIPELINE_CODE)) as tmp:
            shutil.copyfile(pipeline_generator.__file__, tmp)
        index = load_json(os.path.join(folder, "model_index.json"))  # the class name diffusers finds the code by
        write_json(dict(index, _class_name=[PIPELINE_CODE.removesuffix(".py"), "GeneratorPipeline"]),
                   os.path.join(folder, "model_index.json"))
    else:
        save_folder(folder, ConsistencyModelPipeline(unet=net, scheduler=sched))
    if isinstance(backbone, ContextUnet):
        with atomic(os.path.join(folder, "unet", UNET_CODE)) as tmp:
            shutil.copyfile(contextunet.__file__, tmp)
    write_model_card(folder, config)


def real_classes_only(backbone):
    """The student's UNet as its pipeline shows it. A pipeline called without class labels draws them from
    range(num_class_embeds), and a UNet2DModel trained here with label dropout has guidance's null class as its last
    embedding: a student is never asked for it (µreal alone is guided), so that row is dropped. A ContextUnet's
    num_class_embeds already counts the real classes only, and a DiT's num_embeds_ada_norm too (its null label is an
    extra row); other backbones have no null class."""
    n, null = class_labels_of(backbone)
    if not isinstance(backbone, UNet2DModel) or null is None:
        return backbone
    unet = UNet2DModel.from_config(dict({k: v for k, v in backbone.config.items() if k != "_null_class_label"},
                                        num_class_embeds=n))
    unet.load_state_dict(dict(backbone.state_dict(), **{"class_embedding.weight": backbone.class_embedding.weight[:n]}))
    return unet.eval()


def write_model_card(folder, config, report=None):
    """The one writer of a pipeline folder's model card (README.md). `config` is distill.py's (dmd/config.json) with
    steps_done; `report` is evaluate.py's, if any. Its loading code asks for trust_remote_code=True where the folder
    carries its UNet's code."""
    card = model_card(config, report, contextunet=os.path.isfile(os.path.join(folder, "unet", UNET_CODE)),
                      pipeline_code=os.path.isfile(os.path.join(folder, PIPELINE_CODE)))
    with atomic(os.path.join(folder, "README.md")) as tmp, open(tmp, "w") as f:
        f.write(card)


def checkpoint_note(config):
    """Which of a run's students this pipeline holds, and why (distill.py ships the final EMA when there is one)."""
    if config.get("exported") == "student_ema":
        return (f"the exponential moving average of netG's weights (decay {config['ema']}) at the last step: the "
                f"average of the late iterates, which score better than any one of them when training oscillates")
    return "netG's weights at the last step (run with --ema for an averaged student)"


def model_card(config, report=None, contextunet=False, pipeline_code=False):
    """The text of the model card: the hub's metadata header, what the student is, its teacher and recipe, the code
    that loads and runs it (with trust_remote_code=True where the folder carries code: the ContextUnet's in unet/,
    the GeneratorPipeline's), and its evaluation if any."""
    K, classes = len(config["generator_timesteps"]), config.get("num_classes", 0)
    method = "DMD2" if config["reg_weight"] == 0 else "DMD"
    meta = ModelCardData(library_name="diffusers", pipeline_tag="unconditional-image-generation",
                         base_model=config["teacher"] if is_hub_id(config["teacher"]) else None,
                         tags=[method.lower(), "distillation", "one-step" if K == 1 else "few-step",
                               "class-conditional" if classes else "unconditional-image-generation"])
    flags = " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in (
        "lr", "batch_size", "gen_every", "guidance", "reg_weight", "gan_weight", "gan_disc_weight", "gan_t_max",
        "generator_steps") if k in config)
    n = min(classes, 8) or 8
    labels = f"class_labels=list(range({n})), " if classes else ""
    prompts = config.get("prompts")
    code = [f for f, here in ((f"unet/{UNET_CODE}", contextunet), (PIPELINE_CODE, pipeline_code)) if here]
    load = (f'"PATH/TO/THIS/FOLDER", trust_remote_code=True)  # runs {" and ".join(code)}, the folder\'s own code'
            if code else '"PATH/TO/THIS/FOLDER")')
    lines = ["---", meta.to_yaml(), "---", "", f"# A {K}-step image generator distilled with {method}", "",
             f"- teacher: `{config['teacher']}` (weights sha256 {config['teacher_hash']}), {config['prediction_type']}, "
             f"T = {config['T']}; the generator runs at timesteps {config['generator_timesteps']}",
             f"- data: {config['dataset']}" + (f" ({config['data_dir']})" if config.get("data_dir") else ""),
             f"- recipe: `distill.py {flags}`, {config.get('steps_done', '?')} steps",
             f"- checkpoint: {checkpoint_note(config)}", "",
             "```python", "import torch", "from diffusers import DiffusionPipeline",
             f"pipe = DiffusionPipeline.from_pretrained({load}",
             (f"images = pipe({prompts[:2]!r}, num_inference_steps={K}, guidance_scale=1.0,  # its guidance is distilled in\n"
              f"             generator=[torch.Generator().manual_seed(i) for i in range(2)]).images" if prompts else
              f"images = pipe(batch_size={n}, {labels}num_inference_steps={K}, "
              f"generator=[torch.Generator().manual_seed(i) for i in range({n})]).images"), "```"]
    if prompts:
        lines += ["", f"Distilled for {len(prompts)} prompts (e.g. {prompts[0]!r}); guidance {config.get('guidance')} "
                      f"against the empty prompt is part of the student, so guidance_scale must stay 1."]
    elif classes:
        lines += ["", f"Class labels are 0..{classes - 1}; without `class_labels` the pipeline draws them at random."]
    if contextunet:
        lines += ["", "The UNet is the MNIST ContextUnet (its code beside its weights): diffusers warns that it expected "
                      "a UNet2DModel, and runs it."]
    if pipeline_code:
        lines += ["", f"The pipeline is {PIPELINE_CODE}'s GeneratorPipeline (its code in this folder, torch and diffusers "
                      f"only): the generator's {K} step(s), then the VAE's decoding where the student makes latents."]
    if report:
        lines += ["", f"Evaluation ({report['num_samples']} samples on held-out seeds, {report['feature_extractor']}, "
                      f"{report['device']}):", "", "| model | NFE | FID | precision | recall | class accuracy |", "|---|---|---|---|---|---|"]
        for r in report["rows"]:
            acc = "-" if r.get("class_accuracy") is None else f"{r['class_accuracy']:.1%}"
            lines.append(f"| {r['model']} | {r['nfe'] or '-'} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {acc} |")
    return "\n".join(lines) + "\n"


def student_timesteps(folder, T):
    """The generator's timesteps saved with a student; a folder without them (a teacher) is read at T-1, one step."""
    path = os.path.join(folder, GENERATOR_CONFIG)
    return load_json(path)["timesteps"] if os.path.isfile(path) else [T - 1]


def pipeline_subfolder(source):
    """The denoiser's folder of a pipeline folder (model_index.json + unet/ or transformer/ + scheduler/), or None:
    a model folder, or a pipeline folder that holds neither."""
    if not os.path.isfile(os.path.join(source, "model_index.json")):
        return None
    return next((sub for sub in ("unet", "transformer") if os.path.isdir(os.path.join(source, sub))), None)


def load_teacher(source):
    """(backbone, scheduler, vae or None) from a model folder (the backbone's config + weights +
    scheduler_config.json), a pipeline folder (unet/ or transformer/ + scheduler/, as DDPMPipeline or DiTPipeline's
    save_pretrained writes it) or a hub id, in eval mode on the CPU. A vae/ beside the backbone (an AutoencoderKL)
    makes it a latent teacher. The scheduler is loaded as the class its config names (schedules.py knows two
    families; another is refused)."""
    sub, local_only = pipeline_subfolder(source) if os.path.isdir(source) else None, False
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "model_index.json")) and sub is None:
            raise UserError(f"pipeline folder '{source}' has no unet/ or transformer/: pass the folder that a "
                            f"pipeline's save_pretrained wrote (model_index.json, unet/, scheduler/) or a model folder")
        if not any(os.path.isfile(os.path.join(source, sub or "", f)) for f in WEIGHT_FILES):
            raise UserError(f"teacher folder '{source}' has no {WEIGHT_FILES[0]}: train one with "
                            f"`python train_teacher.py` or pass --teacher FOLDER holding a saved teacher")
    elif not is_hub_id(source):
        raise UserError(f"teacher '{source}' is neither a folder nor a hub id: train one with `python train_teacher.py` "
                        f"or pass --teacher FOLDER")
    else:
        local_only = hub_local_only(source)
    try:
        config = BACKBONES["UNet2DModel"].load_config(source, subfolder=sub, local_files_only=local_only)
        cls = BACKBONES.get(config.get("_class_name"))
        if cls is None:
            raise UserError(f"teacher '{source}' is a {config.get('_class_name')}; supported backbones: "
                            f"{', '.join(BACKBONES)}")
        backbone = cls.from_pretrained(source, subfolder=sub, local_files_only=local_only)
        scheduler_folder = "scheduler" if sub else None
        name = DDPMScheduler.load_config(source, subfolder=scheduler_folder,  # any scheduler class reads the file
                                         local_files_only=local_only)["_class_name"]
        scheduler = scheduler_class(name).from_pretrained(source, subfolder=scheduler_folder, local_files_only=local_only)
        vae_folder = os.path.join(source, "vae")  # by its path: diffusers' subfolder= would take a model folder's
        vae = AutoencoderKL.from_pretrained(vae_folder).eval() if os.path.isdir(vae_folder) else None  # own weights
        text = (load_text_encoder(source, backbone.config.addition_embed_type == "text_time")
                if isinstance(backbone, UNet2DConditionModel) else None)
    except UserError:
        raise
    except Exception as e:  # network down, missing files, truncated or foreign weights: one line, not a traceback
        if os.path.isdir(source):
            raise UserError(f"teacher folder '{source}' could not be loaded ({str(e).splitlines()[0][:150]}): "
                            f"re-save it with `python train_teacher.py` or point --teacher at a complete folder")
        raise UserError(f"could not fetch hub id '{source}' ({str(e).splitlines()[0][:100]}): download it where there "
                        f"is a network (`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    if vae is not None and vae.config.latent_channels != backbone.config.in_channels:
        raise UserError(f"teacher '{source}': its vae/ makes latents of {vae.config.latent_channels} channels but the "
                        f"denoiser takes {backbone.config.in_channels}: pair the denoiser with the VAE it was trained on")
    return backbone.eval(), scheduler, vae, text


def load_text_encoder(source, sdxl=False):
    """A text-to-image teacher's TextEncoder: text_encoder/ (CLIPTextModel) and tokenizer/ (CLIPTokenizer) beside
    its UNet, as in SD 1.x / 2.x pipeline folders; with `sdxl` (its UNet takes added text and time conditions) also
    text_encoder_2/ (CLIPTextModelWithProjection) and tokenizer_2/, and the empty prompt as zeros unless the
    pipeline's model_index.json sets force_zeros_for_empty_prompt false (a student's folder has none: the default)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
    subs = ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if sdxl else ())
    folders = [os.path.join(source, sub) for sub in subs] if os.path.isdir(source) else []
    if not folders or not all(os.path.isdir(f) for f in folders):
        pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
        raise UserError(f"teacher '{source}' is a text-to-image UNet (UNet2DConditionModel{', SDXL' if sdxl else ''}) "
                        f"with no {'/, '.join(subs)}/ beside it: pass the folder that {pipeline}.save_pretrained wrote")
    first = CLIPTokenizer.from_pretrained(folders[1]), CLIPTextModel.from_pretrained(folders[0])
    if not sdxl:
        return TextEncoder(*first)
    index = os.path.join(source, "model_index.json")
    zeros = load_json(index).get("force_zeros_for_empty_prompt", True) if os.path.isfile(index) else True
    return TextEncoder(*first, CLIPTokenizer.from_pretrained(folders[3]),
                       CLIPTextModelWithProjection.from_pretrained(folders[2]), zero_null=zeros)


def default_teacher(dataset, run_dir):
    """<run-dir>/teacher when it exists (or the dataset has no pretrained teacher), else the hub id."""
    local = os.path.join(run_dir, TEACHER)
    return local if os.path.isdir(local) or PRESETS[dataset]["teacher"] is None else PRESETS[dataset]["teacher"]


def is_hub_id(source):
    """"owner/name" that is no path here."""
    return not os.path.exists(source) and not source.startswith((".", "/")) and source.count("/") == 1


def hub_local_only(source, timeout=5):
    """True where hub id `source` is in huggingface_hub's cache: it loads from there, with no network (a hub teacher
    is named by its weights' hash anyway). Else False, once the hub has answered for it: asked once through
    huggingface_hub (its offline mode, endpoint and proxies), a machine without network fails at once with one line,
    where the download itself would retry for ~25 s."""
    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return True
    try:
        HfApi().model_info(source, timeout=timeout)
    except RepositoryNotFoundError:
        raise UserError(f"hub id '{source}' is not on the hub (or is private): check the id, or pass --teacher FOLDER")
    except Exception as e:  # offline mode, no network, timeout
        raise UserError(f"hub id '{source}' cannot be fetched without network ({str(e).splitlines()[0][:100]}): "
                        f"download it where there is a network (`hf download {source} --local-dir DIR`) and pass "
                        f"--teacher DIR")
    return False


def check_image_shape(den, dataset, source):
    """A teacher must make images of the preset's shape, decoded for a latent teacher (a custom run takes the
    teacher's)."""
    got, want = den.image_shape, PRESETS[dataset]["shape"]
    if want is not None and tuple(got) != tuple(want):
        raise UserError(f"teacher '{source}' makes {'x'.join(map(str, got))} images but {dataset} is "
                        f"{'x'.join(map(str, want))}: pass the --dataset it was trained on, or a teacher for {dataset}")


def weights_hash(source):
    """sha256 (first 16 hex digits) of a teacher's weight file, and of its VAE's and text encoder's where it has them
    (the images its latents decode to, the prompts it reads, are part of the teacher): pairs and students name their
    teacher by it."""
    folder = os.path.join(source, pipeline_subfolder(source) or "") if os.path.isdir(source) else source
    path = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:  # a hub id: hash the file that load_teacher put in the cache
        path = try_to_load_from_cache(source, WEIGHT_FILES[0])
    paths = [path]
    for part, files in (("vae", WEIGHT_FILES), *((sub, ("model.safetensors", "pytorch_model.bin"))
                                                  for sub in ("text_encoder", "text_encoder_2"))):
        found = [os.path.join(source, part, f) for f in files if os.path.isfile(os.path.join(source, part, f))]
        paths += found[:1] if os.path.isdir(source) else []
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def open_teacher(source, dataset, guidance=None, device="cpu", prompts=None):
    """The one way every script opens a teacher (or a student, which is saved the same way): load it, check it makes
    the dataset's images, wrap it as a Denoiser (with its VAE, for a latent teacher; with its text encoder reading
    `prompts`, the labels, for a text-to-image one), and resolve the guidance scale (None = recipes.default_guidance),
    refusing guidance for a teacher without a null class. Returns (Denoiser in eval mode on `device`, guidance)."""
    backbone, scheduler, vae, text = load_teacher(source)
    if text is not None and not prompts:
        raise UserError(f"teacher '{source}' is text-to-image: pass --prompts FILE (one prompt a line), the prompts "
                        f"its images are made for")
    if text is None and prompts:
        raise UserError(f"--prompts is for text-to-image teachers (a UNet2DConditionModel with a text encoder); "
                        f"'{source}' is a {type(backbone).__name__}: drop --prompts")
    if text is not None and isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise UserError(f"teacher '{source}' is a flow-matching text-to-image UNet: its students would need SD3's kind "
                        f"of pipeline, which this project does not export; text-to-image teachers here are SD 1.x / "
                        f"2.x-shaped (a DDPM-family scheduler)")
    if text is not None:
        text.to(device).set_prompts(prompts)
    den = Denoiser(backbone, scheduler, vae, text).to(device).eval()
    check_image_shape(den, dataset, source)
    guidance = default_guidance(den.null_label is not None) if guidance is None else guidance
    check_guidance(den, guidance, source)
    return den, guidance
