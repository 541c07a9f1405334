"""Teachers and students on disk: loading a teacher (a model folder, a pipeline folder or a hub id), saving teachers,
students and the student's diffusers pipeline with its model card, and the weights hash that names a teacher.

A teacher is one folder holding `config.json` + `diffusion_pytorch_model.safetensors` (the backbone) and
`scheduler_config.json` (its DDPM noise schedule) - the same flat layout as the hub's google/ddpm-cifar10-32.
"""
import hashlib
import os
import socket

from diffusers import DDPMScheduler

from cli import UserError
from denoiser import Denoiser, check_guidance
from files import TEACHER, atomic, load_json, save_folder, write_json
from networks import BACKBONES, image_shape
from recipes import PRESETS, default_guidance

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
GENERATOR_CONFIG = "generator.json"  # in a student's folder: the timesteps of its K steps


def save_teacher(backbone, scheduler, folder):
    """Diffusers layout (backbone + scheduler in one folder), every file renamed into place whole."""
    save_folder(folder, backbone, scheduler)


def save_student(backbone, scheduler, folder, timesteps):
    """A student: the teacher's folder layout plus generator.json, the generator's timesteps (K = their number), so
    that sampling, evaluation and the pipeline export run it at the timesteps it was trained for."""
    save_folder(folder, backbone, scheduler)
    write_json(dict(timesteps=[int(t) for t in timesteps]), os.path.join(folder, GENERATOR_CONFIG))


def save_pipeline(backbone, scheduler, folder, timesteps, card):
    """The student as a diffusers pipeline that `DiffusionPipeline.from_pretrained(folder)` loads with diffusers and
    torch alone (a ContextUnet student: with this repository's models.py importable): ConsistencyModelPipeline, a
    few-step generator pipeline that passes class labels to its UNet, with a scheduler that runs the student at its
    timesteps. One step: DDIM with trailing spacing (its one step is t = T-1 and returns x̂0). K steps: LCM, whose
    multistep sampling re-noises x̂0 with fresh noise exactly as sampling.sample_generator does (its timesteps are
    generator_timesteps'; intermediate x̂0 are not clipped, as here). `card` is the folder's README.md."""
    from diffusers import ConsistencyModelPipeline, DDIMScheduler, LCMScheduler
    if len(timesteps) == 1:
        sched = DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")
    else:
        sched = LCMScheduler.from_config(scheduler.config, original_inference_steps=len(timesteps), clip_sample=False)
    save_folder(folder, ConsistencyModelPipeline(unet=backbone, scheduler=sched))
    with atomic(os.path.join(folder, "README.md")) as tmp, open(tmp, "w") as f:
        f.write(card)


def model_card(config, report=None):
    """README.md of an exported student: what it is, its teacher and recipe, how to run it, its evaluation if any."""
    K, classes = len(config["generator_timesteps"]), config.get("num_classes", 0)
    flags = " ".join(f"--{k.replace('_', '-')} {config[k]}" for k in (
        "lr", "batch_size", "gen_every", "guidance", "reg_weight", "gan_weight", "gan_disc_weight", "gan_t_max",
        "generator_steps") if k in config)
    labels = f"class_labels=list(range({min(classes, 8)})), " if classes else ""
    lines = [f"# A {K}-step image generator distilled with {'DMD2' if config['reg_weight'] == 0 else 'DMD'}", "",
             f"- teacher: `{config['teacher']}` (weights sha256 {config['teacher_hash']}), {config['prediction_type']}, "
             f"T = {config['T']}; the generator runs at timesteps {config['generator_timesteps']}",
             f"- data: {config['dataset']}" + (f" ({config['data_dir']})" if config.get("data_dir") else ""),
             f"- recipe: `distill.py {flags}`, {config.get('steps_done', '?')} steps", "",
             "```python", "import torch", "from diffusers import DiffusionPipeline",
             "pipe = DiffusionPipeline.from_pretrained(\"PATH/TO/THIS/FOLDER\")  # a ContextUnet: run from the repository",
             f"images = pipe(batch_size={min(classes, 8) or 8}, {labels}num_inference_steps={K}, "
             f"generator=[torch.Generator().manual_seed(i) for i in range({min(classes, 8) or 8})]).images", "```"]
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
    """"unet" where `source` is a pipeline folder (model_index.json, unet/, scheduler/), else None (a model folder)."""
    return "unet" if os.path.isfile(os.path.join(source, "model_index.json")) else None


def load_teacher(source):
    """(backbone, scheduler) from a model folder (the backbone's config + weights + scheduler_config.json), a pipeline
    folder (unet/ + scheduler/, as DDPMPipeline.save_pretrained writes it) or a hub id, in eval mode on the CPU."""
    sub = pipeline_subfolder(source) if os.path.isdir(source) else None
    if os.path.isdir(source):
        if sub and not os.path.isdir(os.path.join(source, sub)):
            raise UserError(f"pipeline folder '{source}' has no unet/: pass the folder that DDPMPipeline.save_pretrained "
                            f"wrote (model_index.json, unet/, scheduler/) or a model folder")
        if not any(os.path.isfile(os.path.join(source, sub or "", f)) for f in WEIGHT_FILES):
            raise UserError(f"teacher folder '{source}' has no {WEIGHT_FILES[0]}: train one with "
                            f"`python train_teacher.py` or pass --teacher FOLDER holding a saved teacher")
    elif os.path.exists(source) or source.startswith((".", "/")) or source.count("/") != 1:
        raise UserError(f"teacher '{source}' is neither a folder nor a hub id: train one with `python train_teacher.py` "
                        f"or pass --teacher FOLDER")
    elif not hub_reachable() and not hub_cached(source):
        raise UserError(f"hub id '{source}' cannot be fetched without network: download it where there is a network "
                        f"(`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    try:
        config = BACKBONES["UNet2DModel"].load_config(source, subfolder=sub)
        cls = BACKBONES.get(config.get("_class_name"))
        if cls is None:
            raise UserError(f"teacher '{source}' is a {config.get('_class_name')}; supported backbones: "
                            f"{', '.join(BACKBONES)}")
        backbone = cls.from_pretrained(source, subfolder=sub)
        scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler" if sub else None)
    except UserError:
        raise
    except Exception as e:  # network down, missing files, truncated or foreign weights: one line, not a traceback
        if os.path.isdir(source):
            raise UserError(f"teacher folder '{source}' could not be loaded ({str(e).splitlines()[0][:150]}): "
                            f"re-save it with `python train_teacher.py` or point --teacher at a complete folder")
        raise UserError(f"could not fetch hub id '{source}' ({str(e).splitlines()[0][:100]}): download it where there "
                        f"is a network (`hf download {source} --local-dir DIR`) and pass --teacher DIR")
    return backbone.eval(), scheduler


def default_teacher(dataset, run_dir):
    """<run-dir>/teacher when it exists (or the dataset has no pretrained teacher), else the hub id."""
    local = os.path.join(run_dir, TEACHER)
    return local if os.path.isdir(local) or PRESETS[dataset]["teacher"] is None else PRESETS[dataset]["teacher"]


def hub_reachable(timeout=3.0):
    """Fail fast offline instead of waiting out the hub client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_cached(source):
    try:
        BACKBONES["UNet2DModel"].load_config(source, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def check_image_shape(backbone, dataset, source):
    """A teacher must make images of the preset's shape (a custom run takes the teacher's)."""
    got, want = image_shape(backbone), PRESETS[dataset]["shape"]
    if want is not None and tuple(got) != tuple(want):
        raise UserError(f"teacher '{source}' makes {'x'.join(map(str, got))} images but {dataset} is "
                        f"{'x'.join(map(str, want))}: pass the --dataset it was trained on, or a teacher for {dataset}")


def weights_hash(source):
    """sha256 (first 16 hex digits) of a teacher's weight file: pairs and students name their teacher by it."""
    folder = os.path.join(source, pipeline_subfolder(source) or "") if os.path.isdir(source) else source
    path = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
    if path is None:  # a hub id: hash the cached file
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(source, "diffusion_pytorch_model.safetensors")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def open_teacher(source, dataset, guidance=None, device="cpu"):
    """The one way every script opens a teacher (or a student, which is saved the same way): load it, check it makes
    the dataset's images, wrap it as a Denoiser, and resolve the guidance scale (None = recipes.default_guidance),
    refusing guidance for a teacher without a null class. Returns (Denoiser in eval mode on `device`, guidance)."""
    backbone, scheduler = load_teacher(source)
    check_image_shape(backbone, dataset, source)
    den = Denoiser(backbone, scheduler).to(device).eval()
    guidance = default_guidance(den.null_label is not None) if guidance is None else guidance
    check_guidance(den, guidance, source)
    return den, guidance
