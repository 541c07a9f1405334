"""Text-to-image teachers: a tiny Stable-Diffusion-shaped pipeline folder (a UNet2DConditionModel, a VAE, a CLIP text
encoder and tokenizer, built from configs here) in, a StableDiffusionPipeline out; prompts as the labels, guidance
against the empty prompt, real images from an image-caption folder, LoRA adapters on one shared base."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import fake_images, read_json, run
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import models
from checkpoints import load_teacher, load_text_encoder
from data import prompt_classes
from metrics import class_accuracy
from models import make_text_encoder

SIZE = 16
PROMPTS = ["a photo of a cat", "a photo of a dog"]


def tiny_sd(folder, seed=0):
    """An SD-shaped pipeline folder as StableDiffusionPipeline.save_pretrained writes it: 16x16 RGB images, 8x8x4
    latents, a 2-level UNet2DConditionModel attending to a 32-wide CLIP text encoder."""
    torch.manual_seed(seed)
    tokenizer, text_model = make_text_encoder(PROMPTS + ["a good photo of a cat", "a cat", "a dog"], width=32, layers=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=SIZE)
    unet = UNet2DConditionModel(**dict(models.small_text_unet((4, SIZE // 2, SIZE // 2), 32), layers_per_block=1))
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False)
    StableDiffusionPipeline(vae=vae, text_encoder=text_model, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    return folder


def caption_folder(root):
    """Real images in class subfolders with their captions in metadata.jsonl (the image-caption convention)."""
    rows = []
    for name in ("cat", "dog"):
        fake_images(root / name, n=6, size=20)
        rows += [dict(file_name=f"{name}/{f}", text=f"a {name}") for f in sorted(os.listdir(root / name))]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (root / "eval_prompts.txt").write_text("a good photo of a cat\na good photo of a dog\n")
    return root


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """The tiny SD pipeline through precompute, the warm start and DMD2 with the GAN on captioned real images."""
    root = tmp_path_factory.mktemp("sd")
    teacher, data, r = tiny_sd(root / "teacher"), caption_folder(root / "data"), root / "run"
    flags = ["--teacher", teacher, "--run-dir", r, "--prompts", data / "prompts.txt"]
    run("precompute.py", *flags, "--num-pairs", 8, "--sampling-steps", 2)
    run("distill.py", *flags, "--out", "kd", "--reg-weight", 1, "--dm-weight", 0, "--reg-loss", "pseudo_huber",
        "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    run("distill.py", *flags, "--data-dir", data, "--generator-init", r / "kd" / "student", "--reg-weight", 0,
        "--gan-weight", 1e-2, "--guidance", 2, "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    return root


SNIPPET = """
import sys
import numpy as np, torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
prompts = open(sys.argv[2]).read().split("\\n")[:2] * 2
images = pipe(prompts, num_inference_steps=1, guidance_scale=1.0, output_type="np",
              generator=[torch.Generator().manual_seed(i) for i in range(4)]).images
np.save(sys.argv[3], images)
assert not [m for m in ("models", "checkpoints", "dmd", "sampling") if m in sys.modules]
"""


def pipeline_matches_sample_py(r, teacher, prompts, tmp_path):
    """sample.py's images of the student against its pipeline's (StableDiffusionPipeline, or SDXL's), in a fresh
    process that imports only diffusers and transformers: the largest difference on the [0, 1] scale."""
    run("sample.py", "--teacher", teacher, "--run-dir", r, "--model", "student", "--prompts", prompts,
        "--num-samples", 4, "--out", tmp_path / "s")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", SNIPPET, str(r / "dmd" / "pipeline"), str(prompts), str(tmp_path / "p.npy")],
                       cwd=tmp_path, env=dict(env, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    ours, theirs = np.load(tmp_path / "s" / "samples.npz")["images"] / 255.0, np.load(tmp_path / "p.npy")
    assert ours.shape == theirs.shape == (4, SIZE, SIZE, 3)
    return np.abs(ours - theirs).max()


def test_sd_pipeline_in_stable_diffusion_pipeline_out(sd_run, tmp_path):
    """An SD pipeline folder through --teacher DIR and --prompts: the pairs and the student record the prompts, the
    student is exported as a StableDiffusionPipeline (VAE, text encoder, tokenizer, the student's UNet, one DDIM step)
    that reproduces sample.py within 1/255 from a fresh process, called as its model card says (guidance_scale 1)."""
    r, data = sd_run / "run", sd_run / "data"
    assert read_json(r / "pairs" / "meta.json")["prompts"] == PROMPTS
    assert read_json(r / "dmd" / "config.json")["prompts"] == PROMPTS
    index = read_json(r / "dmd" / "pipeline" / "model_index.json")
    assert index["_class_name"] == "StableDiffusionPipeline" and index["scheduler"][1] == "DDIMScheduler"
    assert "guidance_scale=1.0" in (r / "dmd" / "pipeline" / "README.md").read_text()
    assert pipeline_matches_sample_py(r, sd_run / "teacher", data / "prompts.txt", tmp_path) <= 1 / 255 + 1e-6


def test_yardstick_on_held_out_prompts(sd_run):
    """evaluate.py --prompts: every row made for the held-out prompts, the classifier on the data's classes (its
    subfolders), class accuracy against the class each prompt names; the report keeps the prompts."""
    r, data = sd_run / "run", sd_run / "data"
    run("evaluate.py", "--fid", "--teacher", sd_run / "teacher", "--run-dir", r, "--data-dir", data, "--prompts",
        data / "eval_prompts.txt", "--num-samples", 4, "--batch-size", 4, "--classifier-epochs", 1, "--ddim-steps", 1,
        "--teacher-guidance", 2, "--extend-rows", 0)
    report = read_json(r / "eval" / "report.json")
    assert report["setup"]["prompts"] == ["a good photo of a cat", "a good photo of a dog"]
    assert read_json(r / "classifier" / "config.json")["num_outputs"] == 2  # cat, dog: the data's classes
    for row in report["rows"]:
        if row["model"] != "real":  # 4 samples, each scored against its prompt's class
            assert row["class_accuracy"] in (0, 0.25, 0.5, 0.75, 1), row


def test_guidance_is_against_the_empty_prompt(tmp_path):
    """Denoiser.guided on a text-to-image teacher: out(∅) + s (out(prompt) - out(∅)), ∅ the empty prompt's
    embedding (SD's negative prompt), the prompts' labels their rows of the text encoder's table."""
    backbone, scheduler, vae, text = load_teacher(str(tiny_sd(tmp_path / "t")))
    text.set_prompts(PROMPTS)
    den = models.Denoiser(backbone, scheduler, vae, text).eval()
    assert (den.num_classes, den.null_label) == (2, 2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([500, 500]), torch.tensor([1, 0])
    with torch.no_grad():
        embeds = text.encode([PROMPTS[1], PROMPTS[0]])[0]
        cond = backbone(x, t, encoder_hidden_states=embeds).sample
        uncond = backbone(x, t, encoder_hidden_states=text.encode(["", ""])[0]).sample
        torch.testing.assert_close(den.guided(x, t, y, 3.0), uncond + 3.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_prompt_classes_and_their_accuracy():
    """The class a prompt names is the longest class name in it as whole words ("t-shirt/top" before "shirt"); class
    accuracy scores each image against its prompt's class and leaves prompts of no class out."""
    names = ["T-shirt/top", "Trouser", "Shirt", "Bag"]
    assert prompt_classes(["a photo of a t-shirt/top", "a shirt", "a bagel", "two trousers", "a BAG"], names) == [
        0, 2, -1, -1, 3]

    class Fixed(torch.nn.Module):  # says class (image mean > 0) for every image
        def forward(self, x):
            logits = torch.stack([-x.mean((1, 2, 3)), x.mean((1, 2, 3))], 1)
            return logits, logits
    images = torch.cat([torch.ones(2, 1, 4, 4), -torch.ones(2, 1, 4, 4)])  # classes 1, 1, 0, 0
    labels = torch.tensor([0, 1, 2, 0])  # prompts; prompt 0 names class 1, prompt 1 class 0, prompt 2 none
    assert class_accuracy(Fixed(), images, labels, [1, 0, -1]) == pytest.approx(1 / 3)  # right on the first only


def test_lora_adapters_on_one_shared_base(sd_run, tmp_path):
    """--lora-rank: netG and µfake are LoRA adapters on the teacher itself, which µreal is and which no update
    changes; only the adapters (and the head) are trained and kept in the training state; the student is saved with
    its adapter fused, and its pipeline reproduces sample.py."""
    r, data, teacher = tmp_path / "run", sd_run / "data", sd_run / "teacher"
    run("distill.py", "--teacher", teacher, "--run-dir", r, "--prompts", data / "prompts.txt", "--data-dir", data,
        "--reg-weight", 0, "--gan-weight", 1e-2, "--lr", 1e-3, "--steps", 3, "--batch-size", 4, "--probe-every", 0,
        "--lora-rank", 2)
    summary = read_json(r / "dmd" / "summary.json")
    assert summary["mu_real_checksum"][0] == summary["mu_real_checksum"][1]  # the base: untouched
    state = torch.load(r / "dmd" / "train_state.pt", weights_only=True)
    assert state["net_g"] and all(".generator." in k for k in state["net_g"])
    assert all(".fake." in k for k in state["mu_fake"]) and state["gan_head"]
    student = UNet2DConditionModel.from_pretrained(r / "dmd" / "student")
    base = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    assert not any("lora" in k for k in student.state_dict())
    moved = [k for k, v in student.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert moved and all(k.endswith(("weight", "bias")) for k in moved)  # fused: the adapted layers' weights moved
    assert pipeline_matches_sample_py(r, teacher, data / "prompts.txt", tmp_path) <= 1 / 255 + 1e-6


def test_text_teacher_trained_here(tmp_path):
    """write_captions.py makes an image-caption folder of a class-labelled dataset (and its prompt files);
    train_teacher.py --text-encoder new trains an SD-shaped teacher on it (a small CLIP text encoder and tokenizer made
    for its captions, saved as SD's)."""
    from conftest import fake_mnist
    (tmp_path / "mnist").mkdir()
    fake_mnist(tmp_path / "mnist", n=20)
    run("write_captions.py", "--dataset", "mnist", "--data-dir", tmp_path / "mnist", "--out", tmp_path / "captions")
    rows = [json.loads(line) for line in (tmp_path / "captions" / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and rows[0] == dict(file_name="0/000000.png", text="a photo of a 0")
    held_out = (tmp_path / "captions" / "eval_prompts.txt").read_text().splitlines()
    distilled = (tmp_path / "captions" / "prompts.txt").read_text().splitlines()
    assert held_out[:2] == ["a photo of a 0", "a picture of a 1"] and len(held_out) == 10  # class k: template k % 5
    assert not set(held_out) & set(distilled) and len(distilled) == 40  # every class, every template, not that pair
    assert rows[0]["text"] in held_out and rows[4]["text"] == "a good photo of a 4"  # the teacher learns all 50
    common = ["--run-dir", tmp_path / "run", "--data-dir", tmp_path / "captions", "--image-size", SIZE, "--channels", 1]
    run("train_vae.py", *common, "--block-out-channels", "8,16", "--max-steps", 2, "--batch-size", 4, "--warmup-steps", 0)
    run("train_teacher.py", *common, "--vae", tmp_path / "run" / "vae", "--text-encoder", "new", "--max-steps", 2,
        "--batch-size", 4, "--sampling-steps", 2)
    teacher = tmp_path / "run" / "teacher"
    assert read_json(teacher / "config.json")["_class_name"] == "UNet2DConditionModel"
    assert (teacher / "text_encoder" / "config.json").is_file() and (teacher / "tokenizer").is_dir()
    a, b = load_text_encoder(str(teacher)).encode(["a photo of a 3", "a photo of a 8"])[0]
    assert not torch.allclose(a, b)  # prompts told apart


def test_bad_text_inputs_are_one_line(sd_run, mnist_run, tmp_path):
    """A prompt file missing or empty, a text-to-image teacher without prompts, prompts for a class-conditional
    teacher, a text-to-image UNet without its text encoder, LoRA on a network peft cannot wrap: one line, exit 2,
    nothing written."""
    import shutil
    teacher, data = sd_run / "teacher", sd_run / "data"
    (tmp_path / "empty.txt").write_text("\n  \n")
    no_text = tmp_path / "no_text"
    shutil.copytree(teacher, no_text)
    shutil.rmtree(no_text / "text_encoder")
    x = tmp_path / "x"
    cases = [
        (["precompute.py", "--teacher", teacher, "--run-dir", x, "--prompts", tmp_path / "nowhere.txt"], "does not exist"),
        (["precompute.py", "--teacher", teacher, "--run-dir", x, "--prompts", tmp_path / "empty.txt"], "holds no prompt"),
        (["precompute.py", "--teacher", teacher, "--run-dir", x], "is text-to-image: pass --prompts FILE"),
        (["precompute.py", "--teacher", mnist_run / "teacher", "--run-dir", x, "--prompts", data / "prompts.txt"],
         "--prompts is for text-to-image teachers"),
        (["precompute.py", "--teacher", no_text, "--run-dir", x, "--prompts", data / "prompts.txt"],
         "with no text_encoder/, tokenizer/"),
        (["distill.py", "--teacher", mnist_run / "teacher", "--run-dir", x, "--lora-rank", 2, "--reg-weight", 0,
          "--probe-every", 0], "peft cannot put LoRA on this ContextUnet"),
        (["distill.py", "--teacher", teacher, "--run-dir", x, "--prompts", data / "prompts.txt", "--lora-rank", 2,
          "--gradient-checkpointing", "--reg-weight", 0], "use one of the two"),
    ]
    for (script, *args), words in cases:
        r = run(script, *args, check=False, limit=60)
        lines = [line for line in r.stderr.splitlines() if line.strip() and "arn" not in line]
        assert r.returncode == 2 and "Traceback" not in r.stderr, (args, r.stderr[-2000:])
        assert lines[-1].startswith("error: ") and words in lines[-1], (args, lines[-3:])
    assert not x.exists()


def test_frozen_parts_in_bf16(sd_run, tmp_path):
    """--frozen-dtype bfloat16: µreal (here the shared LoRA base), the VAE and the text encoder are stored in bf16
    and read in float32 out; netG's and µfake's adapters stay float32; the student's folder ships the teacher's own
    float32 VAE and text encoder, and its pipeline reproduces sample.py."""
    r, data, teacher = tmp_path / "run", sd_run / "data", sd_run / "teacher"
    run("distill.py", "--teacher", teacher, "--run-dir", r, "--prompts", data / "prompts.txt", "--data-dir", data,
        "--reg-weight", 0, "--gan-weight", 1e-2, "--lr", 1e-3, "--steps", 2, "--batch-size", 4, "--probe-every", 0,
        "--lora-rank", 2, "--frozen-dtype", "bfloat16")
    state = torch.load(r / "dmd" / "train_state.pt", weights_only=True)
    assert {v.dtype for v in state["net_g"].values()} == {v.dtype for v in state["mu_fake"].values()} == {torch.float32}
    for part in ("vae/diffusion_pytorch_model", "text_encoder/model"):  # the teacher's, not their bf16 copies
        saved = load_file(r / "dmd" / "pipeline" / f"{part}.safetensors")
        theirs = load_file(teacher / f"{part}.safetensors")
        assert saved.keys() == theirs.keys() and all(torch.equal(saved[k], theirs[k]) for k in saved)
    assert pipeline_matches_sample_py(r, teacher, data / "prompts.txt", tmp_path) <= 1 / 255 + 1e-6


def test_bf16_weights_take_float32_in_and_out(tmp_path):
    """make_dmd_networks(frozen_dtype=bf16) without LoRA: µreal's weights in bf16 (half the bytes), netG's and
    µfake's float32; µreal's x̂0 and the VAE's latents come back in float32, near the float32 teacher's."""
    backbone, scheduler, vae, text = load_teacher(str(tiny_sd(tmp_path / "t")))
    text.set_prompts(PROMPTS)
    teacher = models.Denoiser(backbone, scheduler, vae, text).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([900, 100]), torch.tensor([1, 0])
    with torch.no_grad():
        want = teacher.x0(x, t, y, 2.0)
    half_vae, half_text = models.cast_frozen(copy.deepcopy(vae), torch.bfloat16), copy.deepcopy(text)
    models.cast_frozen(half_text.model, torch.bfloat16)  # (one encoder: SD's)
    net_g, mu_real, mu_fake = models.make_dmd_networks(backbone, scheduler, True, vae=half_vae, text=half_text,
                                                       frozen_dtype=torch.bfloat16)
    assert (mu_real.dtype, net_g.dtype, mu_fake.dtype) == (torch.bfloat16, torch.float32, torch.float32)
    assert sum(p.numel() * p.element_size() for p in mu_real.parameters()) * 2 == sum(
        p.numel() * p.element_size() for p in net_g.parameters())
    with torch.no_grad():
        got = mu_real.x0(x, t, y, 2.0)
        latents = mu_real.vae.encode(torch.rand(2, 3, SIZE, SIZE) * 2 - 1, torch.Generator().manual_seed(0))
        logit = mu_fake(x, t, y, realism=True)
    assert got.dtype == latents.dtype == logit.dtype == torch.float32
    assert (got - want).abs().max() <= 0.05 * want.abs().max()


def tiny_sdxl(folder):
    """An SDXL-shaped pipeline folder: two CLIP text encoders (the second with a projection: the pooled text_embeds)
    and a UNet2DConditionModel with SDXL's added text and time conditions, 16x16 RGB images."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection
    torch.manual_seed(0)
    texts = PROMPTS + ["a cat", "a dog"]
    tokenizer, text_model = make_text_encoder(texts, width=32, layers=1)
    tokenizer_2, base_2 = make_text_encoder(texts, width=16, layers=1, seed=1)
    text_model_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(dict(base_2.config.to_dict(), projection_dim=8)))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=8,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        sample_size=SIZE)
    unet = UNet2DConditionModel(**dict(models.small_text_unet((4, SIZE // 2, SIZE // 2), 32 + 16), layers_per_block=1,
                                       addition_embed_type="text_time", addition_time_embed_dim=4,
                                       projection_class_embeddings_input_dim=8 + 6 * 4))
    StableDiffusionXLPipeline(vae=vae, text_encoder=text_model, text_encoder_2=text_model_2, tokenizer=tokenizer,
                              tokenizer_2=tokenizer_2, unet=unet,
                              scheduler=DDIMScheduler(prediction_type="epsilon", clip_sample=False)).save_pretrained(folder)
    return folder


def test_sdxl_conditions_are_its_pipelines(tmp_path):
    """An SDXL teacher's prompt embeddings and pooled text_embeds are StableDiffusionXLPipeline.encode_prompt's (the
    empty prompt zeros, force_zeros_for_empty_prompt), and its denoiser gets them with the time_ids of its image
    size (original = target = 16 x 16, no crop), guided against the zeros."""
    from diffusers import StableDiffusionXLPipeline
    folder = tiny_sdxl(tmp_path / "t")
    backbone, scheduler, vae, text = load_teacher(str(folder))
    text.set_prompts(PROMPTS)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    embeds, null, pooled, null_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(text.embeds[:2], embeds)
    torch.testing.assert_close(text.pooled[:2], pooled)
    assert not text.embeds[-1].any() and not null.any() and not text.pooled[-1].any() and not null_pooled.any()
    den = models.Denoiser(backbone, scheduler, vae, text).eval()
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([700, 300]), torch.tensor([1, 0])
    time_ids = pipe._get_add_time_ids((SIZE, SIZE), (0, 0), (SIZE, SIZE), torch.float32,
                                      pipe.text_encoder_2.config.projection_dim).expand(2, 6)
    with torch.no_grad():
        cond = backbone(x, t, encoder_hidden_states=embeds[[1, 0]],
                        added_cond_kwargs=dict(text_embeds=pooled[[1, 0]], time_ids=time_ids)).sample
        uncond = backbone(x, t, encoder_hidden_states=null, added_cond_kwargs=dict(text_embeds=null_pooled,
                                                                                   time_ids=time_ids)).sample
        torch.testing.assert_close(den.guided(x, t, y, 2.0), uncond + 2.0 * (cond - uncond), rtol=1e-4, atol=1e-5)


def test_sdxl_pipeline_in_sdxl_pipeline_out(sd_run, tmp_path):
    """An SDXL pipeline folder through precompute.py and DMD2 (the GAN on captioned real images, µreal guided) out
    as a StableDiffusionXLPipeline with both encoders, which reproduces sample.py within 1/255 in a fresh process."""
    teacher, data, r = tiny_sdxl(tmp_path / "teacher"), sd_run / "data", tmp_path / "run"
    flags = ["--teacher", teacher, "--run-dir", r, "--prompts", data / "prompts.txt"]
    run("precompute.py", *flags, "--num-pairs", 4, "--sampling-steps", 2)
    run("distill.py", *flags, "--data-dir", data, "--reg-weight", 0, "--gan-weight", 1e-2, "--guidance", 2,
        "--steps", 2, "--batch-size", 4, "--probe-every", 0)
    index = read_json(r / "dmd" / "pipeline" / "model_index.json")
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert (r / "dmd" / "student" / "text_encoder_2" / "config.json").is_file()
    assert pipeline_matches_sample_py(r, teacher, data / "prompts.txt", tmp_path) <= 1 / 255 + 1e-6
    import shutil
    shutil.rmtree(teacher / "text_encoder_2")  # an SDXL UNet without its second encoder: one line, exit 2
    r = run("sample.py", "--teacher", teacher, "--run-dir", tmp_path / "x", "--prompts", data / "prompts.txt",
            check=False, limit=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "SDXL) with no text_encoder/, tokenizer/, " \
        "text_encoder_2/, tokenizer_2/ beside it" in r.stderr, r.stderr[-2000:]
